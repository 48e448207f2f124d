"""Warm start: how long a process took from its start to a loaded model and to its first image.

The clock starts when the process did (``atelier serve``, ``atelier generate``, a worker), read from the
kernel on Linux, so the import of torch and the building of the app count too; elsewhere it starts
when the engine is built. The first image is logged once and reported by Cog's ``/health-check``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from atelier.engines.tuning import Applied

log = logging.getLogger(__name__)


def process_age() -> float | None:
    """Seconds since this process started; None where the kernel does not say (not Linux)."""
    try:
        with open(f"/proc/{os.getpid()}/stat", "rb") as handle:
            stat = handle.read()
        # Field 22 (starttime, clock ticks since boot); the command name (field 2) may hold spaces: skip past it.
        started_ticks = int(stat.rsplit(b")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


@dataclass
class WarmStart:
    began: float  # time.monotonic() at the process start (or at creation)
    from_process_start: bool
    ready: float | None = None  # seconds from ``began`` to the model loaded (and compiled)
    first_image: float | None = None
    load_seconds: float | None = None
    compile_seconds: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def since_process_start(cls) -> WarmStart:
        age = process_age()
        now = time.monotonic()
        return cls(now - age, True) if age is not None else cls(now, False)

    def mark_ready(self, applied: Applied | None) -> None:
        with self._lock:
            if self.ready is None:
                self.ready = time.monotonic() - self.began
                if applied is not None:
                    self.load_seconds, self.compile_seconds = applied.load_seconds, applied.compile_seconds

    def mark_first_image(self, model: str) -> None:
        with self._lock:
            if self.first_image is not None:
                return
            self.first_image = time.monotonic() - self.began
        origin = "process start" if self.from_process_start else "engine creation"
        log.info("%s: first image %.1fs after %s (%s)", model, self.first_image, origin, self.describe())

    def describe(self) -> str:
        parts = [f"{name} {value:.1f}s" for name, value in self._parts().items() if value is not None]
        return ", ".join(parts) or "not loaded yet"

    def _parts(self) -> dict[str, float | None]:
        return {"ready": self.ready, "load": self.load_seconds, "compile": self.compile_seconds}

    def report(self) -> dict[str, Any]:
        """For ``/health-check``: seconds since the process started, rounded to milliseconds."""

        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        return {
            "from": "process_start" if self.from_process_start else "engine_created",
            "ready_seconds": rounded(self.ready),
            "first_image_seconds": rounded(self.first_image),
            "load_seconds": rounded(self.load_seconds),
            "compile_seconds": rounded(self.compile_seconds),
        }
