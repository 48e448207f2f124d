"""The Replicate platform API door (``/v1/predictions``, ``/v1/models/{owner}/{name}/...``, ``/v1/files``).

``protocol`` (wire models), ``router`` (thin routes), ``service`` (``ReplicateDoor``, built by ``create_app``:
wire <-> job system), ``models`` (addresses and version ids), ``render`` (a prediction
as Replicate shows it), ``headers`` (``Prefer``, ``Cancel-After``), ``files`` (the Files API),
``stream`` (SSE) and ``webhooks`` (signed, durable webhook delivery).
"""

from atelier.api.replicate.router import router
from atelier.api.replicate.service import ReplicateDoor

__all__ = ["ReplicateDoor", "router"]
