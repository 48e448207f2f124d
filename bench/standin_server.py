"""The tests' OpenAI Images stand-in (tests/openai_standin.py) as its own process, for the proxy benchmark.

Two changes make it a fair upstream for throughput numbers, none to its protocol or its checks:

* **Realistic payloads at no CPU cost per request.** The stand-in draws a flat picture and encodes it
  per request (a few KiB, some ms of CPU). Here each distinct answer image is a realistic picture
  (``bench.common.realistic_image``: ~1 MiB as PNG at 1024x1024, like a real render), encoded once and
  cached, so proxies carry real-sized base64 and the upstream costs little CPU.
* **Render time without CPU** (``--delay``): every request waits that long first (``asyncio.sleep``),
  as OpenAI's servers take seconds per image; a proxy that serializes upstream calls shows it.

It prints its base URL (``http://127.0.0.1:PORT/v1``) on stdout once listening, and forgets recorded
requests and answers every few seconds so a long run does not grow.

    python bench/standin_server.py [--delay 0.0]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import socket
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import realistic_image, tests_on_path


@functools.cache
def cached_image(
    width: int,
    height: int,
    fmt: str = "png",
    *,
    index: int = 0,
    transparent: bool = False,
    partial: bool = False,
    compression: int = 100,
) -> bytes:
    """``openai_standin.make_image``'s signature, a realistic picture, encoded once per distinct answer."""
    image = realistic_image(width, height, alpha=transparent, seed=index)
    buffer = io.BytesIO()
    pil_format = {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}[fmt]
    image.save(buffer, pil_format, **({} if fmt == "png" else {"quality": compression}))
    return buffer.getvalue()


def build_app(delay: float) -> tuple[Any, Any]:
    tests_on_path()
    import openai_standin

    openai_standin.make_image = cached_image  # the stand-in looks it up at call time
    standin = openai_standin.StandIn()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and delay:
            await asyncio.sleep(delay)
        await standin(scope, receive, send)

    return app, standin


async def forget(standin: Any) -> None:
    while True:
        await asyncio.sleep(5)
        standin.requests.clear()
        standin.answers.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each request waits before answering")
    args = parser.parse_args()

    import uvicorn

    app, standin = build_app(args.delay)
    # warm the cache for the benchmark's answer, with the arguments the stand-in passes, before listening
    cached_image(1024, 1024, "png", index=0, transparent=False, partial=False, compression=100)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    options = {"http": "h11", "ws": "none", "lifespan": "off", "interface": "asgi3", "log_level": "warning"}
    server = uvicorn.Server(uvicorn.Config(app, access_log=False, backlog=2048, **options))

    async def serve() -> None:
        cleaner = asyncio.create_task(forget(standin))
        task = asyncio.create_task(server.serve([sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        print(f"http://127.0.0.1:{sock.getsockname()[1]}/v1", flush=True)
        await task
        cleaner.cancel()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
