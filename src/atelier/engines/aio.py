"""One asyncio loop in a daemon thread, for engines whose work is async I/O (the OpenAI engine).

A blocking ``generate`` (run in one of the runner's threads) hands its coroutine to this loop and waits
for the result. The loop keeps what should outlive one call — an HTTP connection pool with its TLS
sessions and one SSL context — which a fresh ``asyncio.run`` per call throws away: building the SDK's
client per call loaded the CA bundle each time (~17 ms of CPU per request) and opened a new
connection to the upstream each time.

Started on first use (no thread at import or construction); ``close`` runs an async clean-up on the
loop, then stops it. Using it again after ``close`` starts a fresh loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

CLOSE_TIMEOUT = 5.0


class BackgroundLoop:
    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._loop is not None

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Blocking: run ``coroutine`` on the loop and return its result (or raise its exception)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._started()).result()

    def close(self, cleanup: Callable[[], Awaitable[None]] | None = None) -> None:
        """Run ``cleanup()`` on the loop (if it is running), then stop the loop and its thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        try:
            if cleanup is not None:
                asyncio.run_coroutine_threadsafe(_awaited(cleanup), loop).result(CLOSE_TIMEOUT)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(CLOSE_TIMEOUT)
            if not thread.is_alive():
                loop.close()

    def _started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name=self.name, daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop


async def _awaited(cleanup: Callable[[], Awaitable[None]]) -> None:
    await cleanup()
