"""Events and cancels between processes on one PostgreSQL database: ``LISTEN``/``NOTIFY``.

A process running a job publishes each of its events (``publish``: status, logs, progress, output,
done) on ``atelier_events``; a preview image is stored in ``previews`` and referenced, so a payload
stays far below PostgreSQL's 8 kB limit (kept ``PREVIEWS_KEPT_SECONDS``: a reader behind finds it) (long log text is left out: the reader takes it from the row).
Every process keeps one listening connection (``Relay``) and feeds the events of the jobs it has
subscribers for into the same ``Subscription`` objects the doors read for local jobs, so any API
process serves the SSE stream, ``Prefer: wait`` and the OpenAI stream of a job running anywhere.

The row stays the truth: a notification only wakes the reader, which re-reads the row for every status
change (and polls the rows it follows every ``poll_interval`` seconds, and after a reconnect), so a lost
notification delays an event, never loses one. Log text is relayed by its offset in the logs, so text
seen both in a notification and in the row is delivered once.

``atelier_cancel`` carries cancels to the process holding the job's lease (``on_cancel``);
``atelier_queue`` wakes idle workers when a job is queued (``on_queue``).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, select, text

from atelier.ids import new_id
from atelier.jobs.claims import CANCELS, EVENTS, PREVIEWS_KEPT_SECONDS, QUEUE
from atelier.jobs.events import DoneEvent, Event, LogsEvent, OutputEvent, ProgressReport, StatusEvent, Subscription
from atelier.jobs.records import Prediction, Status, format_time, utc_now
from atelier.jobs.store import PREDICTIONS, Store, _prediction

log = logging.getLogger(__name__)

MAX_LOG_TEXT = 4000  # characters of log text carried in a notification; more is read from the row
RECONNECT_SECONDS = 1.0
SYNC = "sync"  # not a channel: a new follower's first look at its row


def listen_dsn(url: str) -> str:
    """A libpq connection string from the store's SQLAlchemy URL (``postgresql+psycopg://...``)."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Publisher:
    """Sends one process's events in order, from one thread (never on the event loop).

    Each event is one statement (the notification, with the preview's insert or the previews' delete
    in the same statement), sent in autocommit on an engine that does not ping at checkout
    (``claims.Statements``): one round trip an event."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="atelier-notify")

    async def publish(self, event: Event) -> None:
        prediction = event.prediction
        if prediction is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._send, prediction, event)
        except Exception as exc:  # a lost notification only delays a reader (it re-reads the row)
            log.warning("prediction %s: its %s event was not published (%s)", prediction.id, event.kind, exc)

    def close(self) -> None:
        self._thread.shutdown(wait=True)

    def _send(self, prediction: Prediction, event: Event) -> None:
        payload: dict[str, Any] = {"id": prediction.id, "k": event.kind}
        before = ""
        params: dict[str, Any] = {"c": EVENTS, "pid": prediction.id}
        if isinstance(event, LogsEvent):
            if len(event.text) <= MAX_LOG_TEXT:
                payload |= {"t": event.text, "at": len(prediction.logs) - len(event.text)}
        elif isinstance(event, ProgressReport):
            payload |= {"step": event.step, "total": event.total, "message": event.message}
            if event.preview is not None:
                payload["p"] = preview = new_id()
                params |= {"preview": preview, "d": _jpeg(event.preview), "t": format_time(utc_now())}
                before = (
                    "WITH stored AS (INSERT INTO previews (id, prediction_id, data, created_at) "
                    "VALUES (:preview, :pid, :d, :t)) "
                )
        elif isinstance(event, DoneEvent):  # its previews only once old: a late reader still finds the last ones
            before = "WITH gone AS (DELETE FROM previews WHERE prediction_id = :pid AND created_at < :old) "
            params["old"] = format_time(utc_now() - timedelta(seconds=PREVIEWS_KEPT_SECONDS))
        params["p"] = json.dumps(payload, separators=(",", ":"))
        with self.engine.begin() as conn:
            conn.execute(text(before + "SELECT pg_notify(:c, :p)"), params)


def _jpeg(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


class _Follower:
    """One subscription to a job running elsewhere, and how far it has got."""

    def __init__(self, subscription: Subscription, prediction: Prediction) -> None:
        self.subscription = subscription
        self.prediction = prediction
        self.logs = len(prediction.logs)  # characters of the logs delivered
        self.status = prediction.status
        self.ended = False

    def sync(self, row: Prediction) -> None:
        """Deliver what the row says that this subscriber has not seen: a new status, then new log text;
        the end after the last log text."""
        self.prediction = row
        if self.ended:
            return
        changed, self.status = row.status != self.status, row.status
        if changed and not row.terminal:
            self.put(StatusEvent(row.status, row))
        if len(row.logs) > self.logs:
            self.put(LogsEvent(row.logs[self.logs :], row))
            self.logs = len(row.logs)
        if changed and row.terminal:
            self.end(row)

    def end(self, row: Prediction) -> None:
        if row.status == Status.SUCCEEDED:
            self.put(OutputEvent(list(row.output or []), row))
        self.put(StatusEvent(row.status, row))
        self.put(DoneEvent(row.status, row))
        self.ended = True

    def logs_text(self, at: int, text_: str) -> None:
        if at > self.logs:  # text before it has not arrived: the row has it
            return
        new = text_[self.logs - at :]
        if new:
            self.put(LogsEvent(new, self.prediction))
            self.logs += len(new)

    def put(self, event: Event) -> None:
        if self.ended:  # a notification handled after a poll already read the row's end: nothing follows done
            return
        self.subscription.put(event)


class Relay:
    """This process's listening connection and the subscriptions it feeds (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        on_cancel: Callable[[str, str, str], None],
        on_queue: Callable[[], None],
        poll_interval: float = 1.0,
        reads: Engine | None = None,
    ) -> None:
        self.store = store
        self.reads = reads or store.engine  # rows and previews: an autocommit engine makes each read one round trip
        self.on_cancel = on_cancel  # (id, reason, lease owner)
        self.on_queue = on_queue
        self.poll_interval = poll_interval
        self._followers: dict[str, list[_Follower]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._inbox: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.connected = asyncio.Event()

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="atelier-relay-listen"),
            asyncio.create_task(self._handle(), name="atelier-relay-handle"),
            asyncio.create_task(self._poll(), name="atelier-relay-poll"),
        ]
        await self.connected.wait()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for followers in list(self._followers.values()):
            for follower in followers:
                follower.subscription.close()

    def subscribe(self, prediction: Prediction) -> Subscription:
        """Events of ``prediction`` (running elsewhere) from now on; ends after ``done``."""
        subscription = Subscription()
        self.follow(subscription, prediction)
        return subscription

    def follow(self, subscription: Subscription, seen: Prediction) -> None:
        """Feed ``subscription`` the events of ``seen``'s job from the state its reader has seen on: a
        local task's subscriber whose job went on in another process (its lease was taken back)."""
        follower = _Follower(subscription, seen)
        id = seen.id

        def forget(_: Subscription) -> None:
            followers = self._followers.get(id, [])
            if follower in followers:
                followers.remove(follower)
            if not followers:
                self._followers.pop(id, None)

        subscription.rehome(forget)
        self._followers.setdefault(id, []).append(follower)
        self._inbox.put_nowait((SYNC, id))  # what changed between the reader's view and now

    # -- internals ---------------------------------------------------------------------------------------

    async def _listen(self) -> None:
        import psycopg

        dsn = listen_dsn(self.store.url)
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                    for channel in (EVENTS, CANCELS, QUEUE):
                        await conn.execute(f"LISTEN {channel}")
                    self.connected.set()
                    await self._inbox.put(("", ""))  # after a (re)connect: re-read every row followed
                    async for note in conn.notifies():
                        await self._inbox.put((note.channel, note.payload))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("event relay: the listening connection failed (%s); reconnecting", exc)
                await asyncio.sleep(RECONNECT_SECONDS)

    async def _handle(self) -> None:
        while True:
            channel, payload = await self._inbox.get()
            try:
                await self._one(channel, payload)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event relay: a notification could not be handled (%s)", channel)

    async def _one(self, channel: str, payload: str) -> None:
        if channel == QUEUE:
            self.on_queue()
            return
        if channel == "":
            await self._sync(list(self._followers))
            return
        if channel == SYNC:
            await self._sync([payload])
            return
        data = json.loads(payload)
        if channel == CANCELS:
            self.on_cancel(data["id"], data.get("r") or "canceled", data.get("w") or "")
            return
        followers = self._followers.get(data["id"])
        if not followers:
            return
        kind = data.get("k")
        if kind == "logs" and "t" in data:
            for follower in followers:
                follower.logs_text(int(data.get("at", 0)), data["t"])
        elif kind == "progress":
            preview = await asyncio.to_thread(self._preview, data["p"]) if data.get("p") else None
            step, total, message = int(data.get("step") or 0), int(data.get("total") or 0), data.get("message")
            for follower in followers:
                follower.put(ProgressReport(step, total, preview, message, follower.prediction))
        else:
            await self._sync([data["id"]])

    async def _sync(self, ids: list[str]) -> None:
        if not ids:
            return
        rows = await asyncio.to_thread(self._rows, ids)
        for id in ids:
            row = rows.get(id)
            for follower in list(self._followers.get(id, [])):
                if row is not None:
                    follower.sync(row)

    def _rows(self, ids: list[str]) -> dict[str, Prediction]:
        with self.reads.connect() as conn:
            found = conn.execute(select(PREDICTIONS).where(PREDICTIONS.c.id.in_(ids))).mappings()
            return {row["id"]: _prediction(row) for row in found}

    def _preview(self, id: str) -> Any:
        from PIL import Image

        with self.reads.connect() as conn:
            data = conn.execute(text("SELECT data FROM previews WHERE id = :id"), {"id": id}).scalar()
        if data is None:
            return None
        image = Image.open(io.BytesIO(bytes(data)))
        image.load()
        return image

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            if self._followers:
                await self._inbox.put(("", ""))
