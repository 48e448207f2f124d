"""The ordered writer: store calls off the event loop, one at a time, in the order they were made.

The job system's writes go through one of these, held by ``atelier.jobs.store_calls.StoreCalls`` (the
seam every store call of the running service takes; its docstring says why SQLite stays inline). On
PostgreSQL every call is a network round trip, so the loop must not wait on it; but the job system
relies on its writes landing in order (``processing`` before ``succeeded``, a log line before the
final status). A thread pool would reorder them; one thread per process does not (the webhook outbox,
``atelier.jobs.webhooks``, has one of its own)::

    writer = OrderedWriter.for_store(store)
    await writer.call(store.update_prediction, id, status="processing")   # awaited: its result or error
    writer.post(store.update_prediction, id, logs=text)                    # not awaited, still in order
    await writer.drain()                                                   # everything posted is written
    writer.close()

``call`` and ``post`` share one FIFO, so a ``call`` made after a ``post`` sees that write. An error from
a posted call is logged (it has no caller to raise to); ``call`` raises it to its caller. With
``inline=True`` (what ``for_store`` picks for SQLite) calls run at once on the caller's thread: the
embedded setup keeps today's behaviour exactly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

if TYPE_CHECKING:
    from atelier.jobs.store import Store

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class OrderedWriter:
    def __init__(self, *, inline: bool = False, name: str = "atelier-store") -> None:
        self.inline = inline
        self._executor = None if inline else ThreadPoolExecutor(1, thread_name_prefix=name)

    @classmethod
    def for_store(cls, store: Store) -> OrderedWriter:
        """Inline on SQLite (sub-millisecond local calls), a thread of its own on PostgreSQL."""
        return cls(inline=store.dialect == "sqlite")

    async def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` after everything given before it; its result, or its error raised."""
        if self._executor is None:
            return fn(*args, **kwargs)
        future = self._submit(partial(fn, *args, **kwargs))
        return await asyncio.wrap_future(future)

    def post(self, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> None:
        """Run ``fn`` after everything given before it without waiting for it; an error is logged."""
        if self._executor is None:
            try:
                fn(*args, **kwargs)
            except Exception:
                log.exception("store write %s failed", getattr(fn, "__name__", fn))
            return
        self._submit(partial(_logged, fn, *args, **kwargs))

    async def drain(self) -> None:
        """Wait until everything given so far has run."""
        if self._executor is not None:
            await asyncio.wrap_future(self._executor.submit(_nothing))

    def close(self) -> None:
        """Finish what was given (blocking), then stop the thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _submit(self, call: Callable[[], T]) -> Future[T]:
        assert self._executor is not None
        return self._executor.submit(call)


def _nothing() -> None:
    pass


def _logged(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except Exception:
        log.exception("store write %s failed", getattr(fn, "__name__", fn))
