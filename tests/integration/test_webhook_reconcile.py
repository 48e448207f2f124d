"""A crash between a prediction's final status and its stored completed message loses nothing."""

from datetime import timedelta
from pathlib import Path

from atelier.api.replicate.webhooks import WebhookSender
from atelier.jobs.records import Delivery, Prediction, utc_now
from atelier.jobs.store import Store


def finished(id: str, **fields) -> Prediction:
    now = utc_now()
    values = dict(model="m", source="replicate", status="succeeded", webhook="http://127.0.0.1:9/hook",
                  created_at=now, started_at=now, completed_at=now)  # fmt: skip
    return Prediction(id=id, **{**values, **fields})


def test_lost_completed_messages_are_enqueued_again_at_start(tmp_path: Path) -> None:
    store = Store(tmp_path / "atelier.db").open()
    store.insert_prediction(finished("lost"))
    store.insert_prediction(finished("sent"))
    store.insert_prediction(finished("no-hook", webhook=None))
    store.insert_prediction(finished("filtered", webhook_events_filter=["start"]))
    store.insert_prediction(finished("old", completed_at=utc_now() - timedelta(days=2)))
    store.insert_prediction(finished("cog", source="cog"))
    store.enqueue_delivery(Delivery(id="msg_1", prediction_id="sent", event="completed", url="u", body={}))
    sender = WebhookSender(
        store, lambda owner: "whsec_" + "A" * 32, lambda p, base: {"id": p.id}, fallback_base="http://x"
    )
    assert sender.reconcile() == 1
    since = utc_now() - timedelta(hours=1)
    left = {p.id for p in store.finished_without_message("completed", source="replicate", since=since)}
    assert left == {"filtered"}  # its filter leaves completed out: nothing to send
    due = store.due_deliveries(utc_now() + timedelta(seconds=1))
    assert [(d.prediction_id, d.event) for d in due if d.prediction_id != "sent"] == [("lost", "completed")]
    store.close()
