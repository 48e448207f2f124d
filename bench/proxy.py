"""Atelier as an OpenAI Images proxy, against LiteLLM's proxy, in front of the same upstream.

What a user would run instead of Atelier in front of OpenAI is a generic LLM gateway; LiteLLM's proxy
is the common one. Both sit in front of the same stand-in upstream (bench/standin_server.py: the tests'
OpenAI Images stand-in, with realistic ~1 MiB PNG answers cached, and an optional render delay), and
take the same requests with the same bearer token (both authenticate every request: Atelier with
``ATELIER_API_TOKENS``, LiteLLM with its master key): ``POST /v1/images/generations`` with
``{"model": "gpt-image-2", "prompt": ..., "size": "1024x1024", "quality": "low"}`` (PNG, OpenAI's
default), at the same concurrency:

* ``direct``: the client hits the stand-in itself (the floor);
* ``atelier``: ``atelier serve`` with ``ATELIER_ENGINE=openai``, ``OPENAI_BASE_URL`` = the stand-in,
  ``ATELIER_MAX_CONCURRENCY`` = the highest concurrency measured (the default, 1, serializes upstream
  calls: see ``atelier_default`` in full runs);
* ``litellm``: ``litellm --config`` with one ``openai/gpt-image-2`` deployment whose ``api_base`` is
  the stand-in (LiteLLM runs from its own virtualenv: installing ``litellm[proxy]`` into Atelier's
  would add uvloop, which changes Atelier's own server, and downgrade rich).

Each proxy is measured twice: with httpx's default ``Accept-Encoding: gzip, deflate`` (what the openai
SDK sends; LiteLLM then gzips its ~1.4 MB base64 answers, Atelier never compresses) and with
``identity`` (``*_identity``; curl's default). For each: requests/s, latency quartiles, latency added
over ``direct`` at the same concurrency, and the proxy process's CPU time per request (psutil; robust
to a noisy machine). The client is httpx (async, one connection per concurrent caller); it checks each
answer is a 200 carrying ``b64_json``.

    python bench/proxy.py [--quick] [--concurrency 1 8 32] [--delay 0 1] [--litellm PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, Process, atelier_server, emit, free_port, log, machine, ratio, spawn, stopping

LITELLM = REPO / "bench" / ".venv-litellm" / "bin" / "litellm"
BODY = {"model": "gpt-image-2", "prompt": "a lighthouse on a cliff at dusk", "size": "1024x1024", "quality": "low"}
KEY = "sk-bench-4f1c9a7e2d5b8036"  # the caller's token on both proxies (each checks it), and the upstream key
LITELLM_CONFIG = """\
model_list:
  - model_name: gpt-image-2
    litellm_params:
      model: openai/gpt-image-2
      api_base: {upstream}
      api_key: {key}
litellm_settings:
  telemetry: false
  drop_params: false
"""


# -- the three servers --------------------------------------------------------------------------------------


def standin(delay: float, log_dir: Path) -> Process:
    argv = [sys.executable, str(REPO / "bench" / "standin_server.py"), "--delay", str(delay)]
    log_path = log_dir / f"standin-{delay}.log"

    def url_line() -> str:
        lines = [line for line in log_path.read_text().splitlines() if line.startswith("http://")]
        return lines[0] if lines else ""

    process = spawn(f"standin-{delay}", argv, url="", ready=lambda: bool(url_line()), log_dir=log_dir)
    process.url = url_line()
    return process


def atelier(upstream: str, concurrency: int, data_dir: Path, log_dir: Path) -> Process:
    env = {
        "ATELIER_ENGINE": "openai",
        "OPENAI_BASE_URL": upstream,
        "OPENAI_API_KEY": KEY,
        "ATELIER_MAX_CONCURRENCY": str(concurrency),
        "ATELIER_MAX_QUEUE": "1024",
        "ATELIER_API_TOKENS": KEY,
    }
    server = atelier_server(data_dir, env, log_dir=log_dir)
    server.url += "/v1"
    return server


def litellm(upstream: str, executable: Path, log_dir: Path) -> Process:
    import httpx

    config = log_dir / "litellm.yaml"
    config.write_text(LITELLM_CONFIG.format(upstream=upstream, key=KEY))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"LITELLM_MASTER_KEY": KEY, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}
    argv = [str(executable), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]

    def ready() -> bool:
        return httpx.get(f"{url}/health/liveliness", timeout=2).status_code == 200

    server = spawn("litellm", argv, url=url, ready=ready, env=env, log_dir=log_dir, timeout=300)
    server.url += "/v1"
    return server


# -- the load ------------------------------------------------------------------------------------------------


async def load(url: str, concurrency: int, requests: int, warmup: int, encoding: str | None = None) -> dict[str, Any]:
    """``requests`` generations from ``concurrency`` callers (after ``warmup`` untimed ones).

    ``encoding`` is the ``Accept-Encoding`` header; None keeps httpx's (``gzip, deflate``, as the
    openai SDK sends), which lets a gzip-capable proxy compress the ~1.4 MB base64 answers.
    """
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {KEY}", **({"Accept-Encoding": encoding} if encoding else {})}
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as client:

        async def one() -> float:
            started = time.perf_counter()
            response = await client.post("/images/generations", json=BODY)
            body = response.content
            elapsed = time.perf_counter() - started
            if response.status_code != 200 or b'"b64_json"' not in body:
                raise RuntimeError(f"{url}: {response.status_code} {body[:300]!r}")
            return elapsed

        async def caller(count: int, out: list[float]) -> None:
            for _ in range(count):
                out.append(await one())

        await asyncio.gather(*(caller(1, []) for _ in range(min(warmup, concurrency) or 1)))
        latencies: list[float] = []
        share = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
        started = time.perf_counter()
        await asyncio.gather(*(caller(n, latencies) for n in share))
        wall = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "throughput_rps": round(len(latencies) / wall, 2),
        "latency_ms": {
            "median": round(statistics.median(latencies) * 1000, 1),
            "p25": round(statistics.quantiles(latencies, n=4)[0] * 1000, 1),
            "p75": round(statistics.quantiles(latencies, n=4)[2] * 1000, 1),
            "p95": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] * 1000, 1),
        },
    }


def cpu_seconds(process: Process) -> float:
    """CPU time (user + system) of the server process and its children so far."""
    import psutil

    root = psutil.Process(process.process.pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(target: Process, concurrency: int, requests: int, encoding: str | None) -> dict[str, Any]:
    before = cpu_seconds(target)
    result = asyncio.run(load(target.url, concurrency, requests, warmup=concurrency, encoding=encoding))
    spent = cpu_seconds(target) - before
    result["server_cpu_ms_per_request"] = round(spent * 1000 / (result["requests"] + concurrency), 1)
    return result


# -- the comparison -----------------------------------------------------------------------------------------------


def scenario(
    delay: float, levels: list[int], requests: int, litellm_path: Path | None, *, default: bool
) -> dict[str, Any]:
    """One upstream delay: every target at every concurrency, targets interleaved per level."""
    with tempfile.TemporaryDirectory(prefix="atelier-bench-proxy-") as tmp:
        logs = Path(tmp)
        upstream = standin(delay, logs)
        servers = {"direct": upstream, "atelier": atelier(upstream.url, max(levels), logs / "data", logs)}
        if default:
            servers["atelier_default"] = atelier(upstream.url, 1, logs / "data-default", logs)
        if litellm_path:
            servers["litellm"] = litellm(upstream.url, litellm_path, logs)
        # target -> (server, Accept-Encoding): httpx's default (gzip, deflate: what the openai SDK sends)
        # lets LiteLLM gzip its answers; "identity" (curl's default) does not. Atelier never compresses.
        targets = {name: (server, None) for name, server in servers.items()}
        targets |= {
            f"{name}_identity": (servers[name], "identity") for name in ("atelier", "litellm") if name in servers
        }
        with stopping(*servers.values()):
            started = {name: round(server.started_in, 1) for name, server in servers.items()}
            results: dict[str, Any] = {"startup_s": started, "levels": {}}
            for level in levels:
                # with an upstream delay each request takes that long: fewer of them say as much
                count = max(requests, 3 * level) if not delay else max(20, 3 * level)
                row = {}
                for name, (server, encoding) in targets.items():
                    log(f"proxy: delay {delay}s, concurrency {level}, {name} ({count} requests)")
                    row[name] = measure(server, level, count, encoding)
                results["levels"][str(level)] = compare(row)
    return results


def compare(row: dict[str, Any]) -> dict[str, Any]:
    """Latency added over ``direct`` and the Atelier/LiteLLM ratios, for one concurrency level."""
    floor = row["direct"]["latency_ms"]["median"]
    for name, result in row.items():
        if name != "direct":
            result["added_latency_ms"] = round(result["latency_ms"]["median"] - floor, 1)
    for suffix in ("", "_identity"):
        if f"litellm{suffix}" in row:
            a, b = row[f"atelier{suffix}"], row[f"litellm{suffix}"]
            row[f"ratios_atelier/litellm{suffix}"] = {
                "throughput": ratio(a["throughput_rps"], b["throughput_rps"]),
                "median_latency": ratio(a["latency_ms"]["median"], b["latency_ms"]["median"]),
                "added_latency": ratio(a["added_latency_ms"], b["added_latency_ms"]),
                "server_cpu_per_request": ratio(a["server_cpu_ms_per_request"], b["server_cpu_ms_per_request"]),
            }
    return row


def find_litellm(path: str | None) -> Path | None:
    for candidate in (path, str(LITELLM), shutil.which("litellm")):
        if candidate and Path(candidate).exists() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    executable = find_litellm(args.litellm)
    if executable is None:
        log("proxy: LiteLLM not found; install it with: python -m venv bench/.venv-litellm && "
            "bench/.venv-litellm/bin/pip install 'litellm[proxy]'  (measuring direct and atelier only)")  # fmt: skip
    results: dict[str, Any] = {
        "what": "POST /v1/images/generations (1024x1024 png, ~1 MiB) through each proxy to the same stand-in",
        "settings": {
            "concurrency": args.concurrency,
            "delays_s": args.delay,
            "requests": args.requests,
        },
        "litellm": str(executable) if executable else None,
        "litellm_version": litellm_version(executable),
        "scenarios": {},
    }
    for delay in args.delay:
        results["scenarios"][f"upstream_delay_{delay}s"] = scenario(
            delay, args.concurrency, args.requests, executable, default=not args.quick
        )
    return results


def litellm_version(executable: Path | None) -> str | None:
    if executable is None:
        return None
    python = executable.with_name("python")
    import subprocess

    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="concurrency 1 and 8, no delay, 40 requests")
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--delay", nargs="+", type=float, default=[0.0, 1.0], help="upstream render time(s), seconds")
    p.add_argument(
        "--requests",
        type=int,
        default=100,
        help="timed requests per target and level without delay (at least 3x level)",
    )
    p.add_argument("--litellm", help="the litellm executable (default: bench/.venv-litellm/bin/litellm, then PATH)")
    return p


def quick(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        args.concurrency, args.delay, args.requests = [1, 8], [0.0], 40
    return args


def main() -> None:
    args = quick(parser().parse_args())
    emit({"machine": machine(), "proxy": run(args)})


if __name__ == "__main__":
    main()
