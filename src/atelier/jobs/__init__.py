"""The one job system every door (Replicate, Cog, OpenAI, Python) shares.

    records.py    Prediction, FileRecord, Delivery; statuses; UTC time text; redact_secrets
    task.py       Task: the prediction state machine, the only code that changes a status
    events.py     Event and the bounded per-subscriber Subscription
    dispatch.py   Dispatcher: ordered delivery of events to async listeners (webhooks)
    queue.py      JobQueue: live jobs, the FIFO, the bound, the batching seam (next_batch)
    runner.py     Runner: submit / get / cancel / wait / subscribe / list; workers; restart; stop
    routing.py    EngineRouter: which engine serves a request; one-time engine setup
    recovery.py   what a prediction records to run again after a restart, and whether it can
    store.py      Store: SQLite (WAL) or Postgres through SQLAlchemy Core
    migrations.py the schema, as an append-only list of named migrations
    files.py      FileStore: durable files, capability URL signatures, the webhook secret
    blobs.py      where files' bytes live: the data folder (LocalBlobs) or an S3 bucket (S3Blobs)

Wiring (done by ``create_app`` or a script; nothing here runs at import)::

    store = Store(settings.database_path)
    files = FileStore(settings.files_dir, store)
    runner = Runner(store, files, EngineRouter({"flux2-klein-4b": engine}, "flux2-klein-4b"), settings)
    await runner.start()
    prediction = await runner.submit(request, source="python")
    prediction = await runner.wait(prediction.id, timeout=60)
"""
