"""An app served by a real uvicorn on loopback, in this process: for what only real HTTP shows.

In-process transports (``httpx.ASGITransport``) cannot hang up halfway; a socket can::

    with live(app) as server:
        sock = server.send(raw_request("POST", "/predictions", {"input": {...}}))
        ...
        sock.close()          # the client goes away mid-request

The server runs the app's lifespan (the runner starts and stops with it) in a daemon thread.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


@dataclass
class Live:
    url: str
    port: int

    def send(self, request: bytes) -> socket.socket:
        """A new connection that has sent ``request`` (and reads nothing yet)."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        sock.sendall(request)
        return sock


@contextmanager
def live(app: Any) -> Iterator[Live]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False, http="h11", ws="none")
    server = _Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="live-uvicorn", daemon=True)
    thread.start()
    try:
        if not server.ready.wait(60):
            raise RuntimeError("uvicorn did not start")
        port = sock.getsockname()[1]
        yield Live(f"http://127.0.0.1:{port}", port)
    finally:
        server.should_exit = True
        thread.join(60)


def raw_request(method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> bytes:
    """An HTTP/1.1 request as bytes: a JSON body, or ``(content, content_type)`` as given."""
    if isinstance(body, tuple):
        content, content_type = body
    else:
        content, content_type = (json.dumps(body).encode(), "application/json") if body is not None else (b"", "")
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(content)}"]
    lines += [f"Content-Type: {content_type}"] if content_type else []
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + content


def multipart(data: dict[str, str], files: list[tuple[str, tuple[str, bytes, str]]]) -> tuple[bytes, str]:
    """A multipart body (as httpx encodes it) and its content type, for ``raw_request``."""
    request = httpx.Request("POST", "http://x/", data=data, files=files)
    return request.read(), request.headers["content-type"]
