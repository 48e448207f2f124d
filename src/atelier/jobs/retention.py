"""Retention: a finished prediction's inputs, outputs and logs, and uploaded files, are deleted after a period.

``ATELIER_RETENTION`` (``Settings.retention``) sets the period; ``1h`` is Replicate's policy. It is off by
default: on a self-hosted server the operator owns the disk, and images vanishing an hour after they
were made would surprise someone using their own server as a tool. With a period set, a sweep

* clears each prediction that finished (succeeded, failed or canceled) at least a period ago:
  ``input`` becomes ``{}``, ``output`` ``None``, ``logs`` empty, the re-run record is dropped and
  ``data_removed`` is set. Its id, model, status, error, timestamps and metrics stay, so a caller still
  learns what happened (Replicate's ``data_removed: true``, ``output: null``);
* deletes the output files of cleared predictions, uploaded files older than the period, and any file
  past its own ``expires_at``: the row first, then the bytes, so every capability URL to them answers
  404 from then on;
* forgets webhook messages older than the period once they were delivered or given up (their bodies
  hold the prediction as it was).

Predictions still starting or processing are never touched, and neither are the uploads they name in
``input_images`` (a re-queued job loads them again after a restart). Clearing comes before deleting
files, so a crash between the two leaves files that the next sweep finds, never a prediction pointing
at files that are gone.

The sweep is blocking (database and disk): ``Services`` runs it in a thread once at start-up and then
every ``ATELIER_RETENTION_INTERVAL`` seconds. ``clock`` is injectable for tests.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from atelier.jobs.files import FileStore
from atelier.jobs.records import utc_now
from atelier.jobs.store import Store

log = logging.getLogger(__name__)

BATCH = 200
# A URL of one of this server's own files, as an input image names it (see Services.own_file).
_OWN_FILE = re.compile(r"/v1/files/([a-z2-7]{26})(?:/download)?(?:\?|$)")


@dataclass(frozen=True)
class Swept:
    predictions: int = 0
    files: int = 0
    deliveries: int = 0

    def __bool__(self) -> bool:
        return bool(self.predictions or self.files or self.deliveries)


class Retention:
    def __init__(
        self,
        store: Store,
        files: FileStore,
        period: timedelta,
        *,
        clock: Callable[[], datetime] = utc_now,
        batch: int = BATCH,
    ) -> None:
        if period <= timedelta(0):
            raise ValueError(f"retention period must be positive, got {period}")
        self.store = store
        self.files = files
        self.period = period
        self.clock = clock
        self.batch = batch
        self._halt = False  # set when run() is cancelled: a sweep under way stops at its next batch

    def sweep(self) -> Swept:
        """Remove everything older than the period (blocking); returns what was removed."""
        now = self.clock()
        cutoff = now - self.period
        swept = Swept(
            predictions=self._clear_predictions(cutoff),
            files=self._delete_files(cutoff, now),
            deliveries=self.store.delete_finished_deliveries(cutoff),
        )
        if swept:
            log.info(
                "retention: removed the data of %d prediction(s), %d file(s) and %d webhook message(s) from before %s",
                swept.predictions, swept.files, swept.deliveries, cutoff.isoformat(timespec="seconds"),
            )  # fmt: skip
        return swept

    async def run(self, interval: float) -> None:
        """Sweep now and then every ``interval`` seconds, until cancelled; a failed sweep is logged and retried.

        Cancelling waits for a sweep under way to stop at its next batch: the store closes next.
        """
        while True:
            sweep = asyncio.ensure_future(asyncio.to_thread(self.sweep))
            try:
                await asyncio.shield(sweep)
            except asyncio.CancelledError:
                self._halt = True
                await asyncio.gather(sweep, return_exceptions=True)
                raise
            except Exception:
                log.exception("retention sweep failed; retrying in %g s", interval)
            await asyncio.sleep(interval)

    def _clear_predictions(self, cutoff: datetime) -> int:
        count = 0
        while not self._halt and (ids := self.store.expired_predictions(cutoff, self.batch)):
            for id in ids:
                self.store.update_prediction(id, input={}, output=None, logs="", request=None, data_removed=True)
                log.debug("prediction %s: data removed after the retention period", id)
            count += len(ids)
        return count

    def _delete_files(self, cutoff: datetime, now: datetime) -> int:
        keep = self._in_use()
        count = 0
        previous: set[str] = set()
        while not self._halt and (records := self.store.expired_files(cutoff, now, self.batch, keep)):
            ids = {record.id for record in records}
            if ids <= previous:  # rows that would not go (a path outside the files folder): stop, never spin
                log.error("retention: could not delete file(s) %s", ", ".join(sorted(ids)))
                break
            self.files.delete_many(sorted(ids - previous))
            count += len(ids - previous)
            previous = ids
        return count

    def _in_use(self) -> set[str]:
        """Files that unfinished predictions name as input images."""
        ids: set[str] = set()
        for prediction in self.store.unfinished_predictions():
            for url in prediction.input.get("input_images") or ():
                if isinstance(url, str) and (match := _OWN_FILE.search(url)):
                    ids.add(match.group(1))
        return ids
