"""``python tests/e2e/fake_atelier.py serve|worker ...``: the real ``atelier`` command, with the fake engine
of tests/fakes.py as its one model (a fast engine whose work is a fixed wait: the cluster tests and
bench/cluster.py run many processes, and a real pipeline per process would measure torch, not the cluster).

``FAKE_STEP_SECONDS`` is each of its ``FAKE_STEPS`` steps' wait; a prompt containing ``slow`` waits
``FAKE_SLOW_STEP_SECONDS`` per step instead (a job long enough to kill a worker in the middle of).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for fakes.py


def main() -> None:
    import atelier.services
    from atelier.cli import main as run_cli
    from fakes import FakeEngine

    slow_seconds = float(os.environ.get("FAKE_SLOW_STEP_SECONDS", "0.5"))

    class TimedEngine(FakeEngine):
        def generate(self, job: Any, *, progress: Any, cancel: Any) -> Any:
            if "slow" in (job.request.prompt or ""):
                inner = progress

                def progress(event: Any) -> None:  # each step of a slow job waits longer (cancellable)
                    until = time.monotonic() + slow_seconds
                    while time.monotonic() < until and not cancel.cancelled:
                        time.sleep(0.01)
                    inner(event)

            return super().generate(job, progress=progress, cancel=cancel)

    def engines(settings: Any) -> tuple[dict[str, Any], str]:
        steps, delay = int(os.environ.get("FAKE_STEPS", "3")), float(os.environ.get("FAKE_STEP_SECONDS", "0"))
        return {"fake": TimedEngine(model="fake", steps=steps, step_delay=delay)}, "fake"

    atelier.services.build_engines = engines  # type: ignore[assignment]
    run_cli(sys.argv[1:])


if __name__ == "__main__":
    main()
