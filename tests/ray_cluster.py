"""A throwaway local Ray cluster: ``ray start --head --block`` in its own process group, CPUs only, in a
temporary folder of its own, this process connected as its driver; always stopped, and only it.

Used by tests/integration/test_ray_executor.py and bench/ray.py. Replicas import ``atelier`` from
``src/`` and the test engines from ``tests/`` (``PYTHONPATH``), as every node of a real cluster needs
Atelier installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import ray

ROOT = Path(__file__).resolve().parents[1]
START_S = 120.0  # the most the head may take to start before we give up (a broken install, not a slow one)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_cluster(num_cpus: int = 4) -> Iterator[str]:
    """The cluster's address (``127.0.0.1:port``), with this process connected to it. Its Ray Client server
    (unused: ATELIER_RAY_ADDRESS refuses ray://) gets a free port, not the fixed 10001 two clusters would share."""
    folder = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port, client_port = free_port(), free_port()
    path = [str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}",
               f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
               f"--temp-dir={folder}", "--node-ip-address=127.0.0.1",
               f"--ray-client-server-port={client_port}"]  # fmt: skip
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        _connect(address, process)
        yield address
    finally:
        with contextlib.suppress(Exception):
            from ray import serve

            serve.shutdown()
        ray.shutdown()
        _stop_group(process)
        if not os.environ.get("ATELIER_KEEP_RAY_LOGS"):  # set it to read the cluster's logs after a failure
            shutil.rmtree(folder, ignore_errors=True)


def _connect(address: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_S
    while True:
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
            return
        except (ConnectionError, RuntimeError):
            if process.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.5)  # the head is still starting


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to ``ray start --block``, which drains the node and stops what it started (a SIGTERM to the
    whole group would stop the GCS first and leave it waiting for it), then SIGKILL to whatever is left
    of its process group."""
    process.terminate()
    try:
        process.wait(60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
