"""A real ``atelier serve`` process on loopback, with a tiny real pipeline as its model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    data_dir: Path
    process: subprocess.Popen
    log_path: Path
    env: dict[str, str]

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(
    data_dir: Path,
    model_path: Path | None,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 180,
    until: str = "READY",
    command: list[str] | None = None,
) -> Server:
    """Start ``atelier serve`` and wait until its model is loaded (``/health-check`` says ``until``:
    READY, or SETUP_FAILED for a server whose model cannot load).

    ``model_path`` None: no local model named (an OpenAI proxy; naming one with ATELIER_ENGINE=openai is refused).
    ``command``: what to run instead of ``python -m atelier.cli serve`` (e.g. tests/e2e/fake_atelier.py)."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"server-{port}.log"
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "ATELIER_DATA_DIR": str(data_dir),
        **({"ATELIER_MODEL_PATH": str(model_path)} if model_path is not None else {}),
        "ATELIER_PORT": str(port),
        "ATELIER_WEBHOOK_ALLOW": "127.0.0.1",  # the tests' webhook receivers listen on loopback
        **(env or {}),
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command or [sys.executable, "-m", "atelier.cli", "serve"],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", data_dir, process, log_path, environment)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"atelier serve exited with {process.returncode}:\n{server.log}")
        try:
            if httpx.get(f"{server.url}/health-check", timeout=2).json().get("status") == until:
                return server
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"atelier serve was not {until} after {timeout}s:\n{server.log}")


@pytest.fixture(scope="module")
def server(tiny_flux2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server per test module (starting one takes seconds: torch, the model)."""
    running = start_server(tmp_path_factory.mktemp("server") / "data", tiny_flux2)
    yield running
    running.stop()
    # The store redacts a secret that reaches it and says so: a line here is a path that sent it one.
    assert "a secret reached the store" not in running.log, running.log
