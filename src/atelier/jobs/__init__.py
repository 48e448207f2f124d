"""The one job system every door (Replicate, Cog, OpenAI, Python) shares.

    records.py    Prediction, FileRecord, Delivery, Failure; the Status enum; UTC time text; redact_secrets
    task.py       Task: the prediction state machine, the only code that changes a status
    events.py     the event classes (StatusEvent, LogsEvent, ...) and the bounded per-subscriber Subscription
    dispatch.py   Dispatcher: ordered delivery of events to async listeners (webhooks)
    submission.py Submission: one request for a prediction, as a door hands it over
    queue.py      Queue (the contract) and JobQueue: live jobs, fair order, the bound, batching (next_batch)
    intake.py     Intake: submit / get / find / cancel / delete / wait / subscribe / list; admission
    worker.py     Workers: take a batch, run it (the one engine call), deliver outputs, settle
    runner.py     Runner: intake + queue + workers of one process; restart recovery; stop
    store_calls.py StoreCalls: the one seam to the store from the loop (ordered writes, reads off the loop)
    routing.py    EngineRouter: which engine serves a request; one-time engine setup
    recovery.py   what a prediction records to run again after a restart, and whether it can
    store.py      Store: SQLite (WAL) or PostgreSQL (ATELIER_DATABASE_URL) through SQLAlchemy Core
    migrations.py the schema, as an append-only list of named migrations
    files.py      FileStore: durable files, capability URL signatures, the webhook secret
    webhooks.py   WebhookEngine: the one durable webhook outbox and delivery engine every door uses
    writer.py     OrderedWriter: store calls off the event loop, in order (PostgreSQL)
    owner.py      one process per SQLite database (a second is refused at start)
    blobs.py      where files' bytes live: the data folder (LocalBlobs) or an S3 bucket (S3Blobs)

Wiring (done by ``create_app`` or a script; nothing here runs at import)::

    store = Store(settings.database_path)
    files = FileStore(settings.files_dir, store)
    runner = Runner(store, files, EngineRouter({"flux2-klein-4b": engine}, "flux2-klein-4b"), settings)
    await runner.start()
    prediction = await runner.submit(Submission(request, source="python"))
    prediction = await runner.wait(prediction.id, timeout=60)
"""
