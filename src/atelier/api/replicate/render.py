"""How a job-system prediction looks on Replicate's wire, with absolute URLs built from a base URL.

* ``output`` is a list of capability URLs (``/v1/files/{id}/download?sig=...``), even for one image:
  the Python client downloads with the Authorization header, the JS client without, so the URL
  itself grants access (``FileStore.sign``).
* ``urls.stream`` carries a signature too (``FileStore.sign("stream:<id>")``, a domain no file id can
  collide with): JS clients open it without the Authorization header.
* ``held=True`` renders the answer of a ``Prefer: wait`` create that ran out of time.
  # compat: every official client treats any status but "starting" as final and returns ``output``
  # as-is, so an unfinished prediction is shown as "starting" there (never "processing" without output).
"""

from __future__ import annotations

from typing import Any, cast

from atelier.api.replicate import protocol as wire
from atelier.api.replicate.models import HIDDEN, OWNER, SEED
from atelier.jobs.files import FileStore
from atelier.jobs.records import Prediction, Status, format_time
from atelier.jobs.routing import DEFAULT_ALIASES


def prediction_url(base: str, prediction_id: str) -> str:
    return f"{base}/v1/predictions/{prediction_id}"


def stream_token(prediction_id: str) -> str:
    return f"stream:{prediction_id}"


def download_url(base: str, files: FileStore, file_id: str) -> str:
    return f"{base}/v1/files/{file_id}/download?sig={files.sign(file_id)}"


def output_urls(prediction: Prediction, base: str, files: FileStore) -> list[str] | None:
    if prediction.output is None or prediction.data_removed:
        return None
    return [download_url(base, files, file_id) for file_id in prediction.output]


def address_of(prediction: Prediction) -> str:
    """``owner/name`` as the prediction was addressed (other doors' predictions get the nearest name)."""
    named = (prediction.request or {}).get("model")
    if isinstance(named, str) and "/" in named:
        return named
    if named is None or named in DEFAULT_ALIASES:
        return SEED
    return f"{OWNER}/{prediction.model}"


def render(prediction: Prediction, base: str, files: FileStore, *, held: bool = False) -> wire.Prediction:
    url = prediction_url(base, prediction.id)
    stream = f"{url}/stream?sig={files.sign(stream_token(prediction.id))}"
    shown = held and not prediction.terminal
    return wire.Prediction(
        id=prediction.id,
        model=address_of(prediction),
        version=prediction.version or HIDDEN,
        input=prediction.input,
        logs=prediction.logs,
        output=output_urls(prediction, base, files),
        data_removed=prediction.data_removed,
        error=prediction.error,
        status=cast(wire.Status, str(Status.STARTING if shown else prediction.status)),
        created_at=format_time(prediction.created_at),
        started_at=_time(prediction.started_at) if not shown else None,
        completed_at=_time(prediction.completed_at),
        deadline=_time(prediction.deadline),
        urls=wire.PredictionURLs(get=url, cancel=f"{url}/cancel", stream=stream, web=url),
        metrics=metrics(prediction),
    )


def metrics(prediction: Prediction) -> dict[str, Any] | None:
    """Terminal predictions: Replicate's ``predict_time``, ``total_time``, ``image_count``, then Atelier's own."""
    if not prediction.terminal:
        return None
    extra = dict(prediction.metrics)
    return {
        "predict_time": extra.pop("predict_time", 0.0),
        "total_time": extra.pop("total_time", 0.0),
        "image_count": extra.pop("image_count", len(prediction.output or [])),
        **extra,
    }


def _time(value: Any) -> str | None:
    return format_time(value) if value is not None else None
