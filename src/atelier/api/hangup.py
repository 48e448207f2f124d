"""Work follows the caller: a synchronous request whose client hangs up cancels its job.

The OpenAI door (synchronous by contract) and Cog's synchronous predictions wait for their job with
``wait_or_cancel``: the wait is raced against the client's ``http.disconnect``, as vLLM's
``with_cancellation`` does, and a hang-up cancels the job (``Runner.abandon``) so its worker, and the
GPU, go to the next one. The race begins once the body has been read: reading ``receive`` earlier would
take body chunks from the parser. A streamed answer (OpenAI ``stream=true``) is ended by Starlette when
the client goes, and its event generator cancels the job then (``openai_images/streaming.py``).

Replicate predictions are asynchronous by contract: a ``Prefer: wait`` caller who hangs up leaves its
prediction running, to be fetched later; neither is Cog's ``Prefer: respond-async`` watched.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from atelier.errors import Canceled

if TYPE_CHECKING:
    from starlette.types import Receive

    from atelier.jobs.records import Prediction
    from atelier.jobs.runner import Runner

log = logging.getLogger(__name__)

HUNG_UP = "the client disconnected before its answer"


async def wait_or_cancel(runner: Runner, prediction_id: str, receive: Receive | None) -> Prediction:
    """The finished prediction; if the client disconnects first, its job is canceled and ``Canceled`` raised.

    Nothing can reach a client that has gone: the 499 that ``Canceled`` renders to is dropped by the server.
    """
    if receive is None:  # not an HTTP request (or nobody to watch)
        return await runner.wait(prediction_id, None)
    waiting = asyncio.ensure_future(runner.wait(prediction_id, None))
    gone = asyncio.ensure_future(disconnected(receive))
    try:
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not waiting.done():
            waiting.cancel()
    if waiting.done() and not waiting.cancelled():
        return waiting.result()  # finished, even if the client also left meanwhile
    hung_up(runner, prediction_id)
    raise Canceled(HUNG_UP)


def hung_up(runner: Runner, prediction_id: str) -> None:
    """Cancel the job of a caller who went away (synchronous: safe in cleanup code)."""
    log.info("prediction %s: %s; canceling it", prediction_id, HUNG_UP)
    runner.abandon(prediction_id, HUNG_UP)


async def disconnected(receive: Receive) -> None:
    """Return when the client disconnects (the body must have been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass
