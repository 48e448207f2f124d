"""The one real HTTP receiver on loopback for webhooks and uploads: it records every request and answers as
scripted. Every test that receives webhooks uses it.

``Receiver()`` listens on 127.0.0.1 and, where the host has IPv6, on ::1 (another port); ``url(host)``
builds a URL for any spelling of loopback, with the port of the listener that spelling reaches. A test
asserts "never reached" with ``requests == []``: not only that an error came back. ``statuses`` scripts
the next answers (a 3xx points to ``/redirected``, which a webhook must never follow); ``wait_for`` waits
for a condition on what arrived, without sleeping; ``events(path)`` lists the ``status`` of each JSON
body sent to ``path``, the way Replicate's and Cog's webhooks report a prediction.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)  # when it arrived (monotonic seconds)

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class Receiver:
    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.statuses: deque[int] = deque()  # the next answers; 200 once empty
        self.arrived = threading.Event()
        self._changed = threading.Condition()
        handler = self._handler()
        self._servers: list[ThreadingHTTPServer] = [ThreadingHTTPServer(("127.0.0.1", 0), handler)]
        with contextlib.suppress(OSError):  # no IPv6 loopback on this host
            self._servers.append(_V6Server(("::1", 0), handler))
        for server in self._servers:
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def port(self) -> int:
        return int(self._servers[0].server_address[1])

    @property
    def port6(self) -> int | None:
        """The IPv6 listener's port; None where the host has no IPv6 loopback."""
        return int(self._servers[1].server_address[1]) if len(self._servers) > 1 else None

    def url(self, host: str = "127.0.0.1", path: str = "/hook") -> str:
        """``http://{host}:{port}{path}``; ``[::1]`` gets the IPv6 listener's port, every other spelling the IPv4 one."""
        port = self.port6 if host == "[::1]" and self.port6 is not None else self.port
        return f"http://{host}:{port}{path}"

    def wait_for(self, condition: Callable[[Receiver], bool], timeout: float = 30) -> bool:
        """Until ``condition(self)`` holds (True), or ``timeout`` seconds pass (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: condition(self), timeout)

    def events(self, path: str = "/hook") -> list[str]:
        """The ``status`` of each JSON body sent to ``path``, in arrival order."""
        return [r.json()["status"] for r in self.requests if r.path == path]

    def bodies(self) -> list[Any]:
        return [r.json() for r in self.requests]

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._changed:
                    receiver.requests.append(Received(self.command, self.path, dict(self.headers.items()), body))
                    status = receiver.statuses.popleft() if receiver.statuses else 200
                    receiver._changed.notify_all()
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "/redirected")
                self.send_header("Content-Length", "0")
                self.end_headers()
                receiver.arrived.set()

            do_POST = do_PUT = _record

            def log_message(self, *args: Any) -> None:
                pass

        return Handler
