"""Markdown tables from a ``python -m bench`` JSON document (the tables in docs/benchmarks.md).

python bench/report.py bench/results/run.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("—" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def engine_overhead(doc: dict[str, Any]) -> str:
    out = []
    for name, model in doc["models"].items():
        lat = model["latency"]
        rows = [
            ["diffusers, PIL out", lat["diffusers"]["raw"]["median"], lat["diffusers"]["raw"]["p25"], lat["diffusers"]["raw"]["p75"], "—"],
            ["diffusers + save webp (Pillow defaults)", *_q(lat["diffusers"]["webp_pillow_default"]), model["baseline_overhead_ms"]["webp_pillow_default"]],
            ["diffusers + save png (Pillow defaults)", *_q(lat["diffusers"]["png_pillow_default"]), model["baseline_overhead_ms"]["png_pillow_default"]],
            ["diffusers + webp q90 m0 (Atelier's bytes)", *_q(lat["diffusers"]["webp_atelier_settings"]), model["baseline_overhead_ms"]["webp_atelier_settings"]],
            ["Atelier Python API", *_q(lat["atelier_api"]["total"]), model["atelier_api_overhead_ms"]["median"]],
        ]  # fmt: skip
        if "http_replicate" in lat:
            rows += [
                ["Atelier HTTP, Replicate door (Prefer: wait + GET file)", *_q(lat["http_replicate"]["total"]), None],
                ["Atelier HTTP, OpenAI door (b64_json)", *_q(lat["http_openai"]["total"]), None],
            ]
        out.append(f"**{name}** (pipeline median {model['pipeline_median_ms']} ms)\n")
        out.append(table(["path", "median ms", "p25", "p75", "time around diffusers, ms"], rows))
        ratios = [[k, v.get("medians"), v.get("from_overheads")] for k, v in model["ratios"].items()]
        out.append("\n" + table(["ratio", "of medians", "from the overheads"], ratios))
        if "cli" in model:
            cli = model["cli"]
            out.append(
                "\n"
                + table(
                    ["whole process", "median s", "min s"],
                    [
                        ["atelier generate", cli["atelier_cli"]["median"], cli["atelier_cli"]["min"]],
                        ["plain diffusers script", cli["diffusers_script"]["median"], cli["diffusers_script"]["min"]],
                        ["atelier --help", cli["atelier_help"]["median"], cli["atelier_help"]["min"]],
                    ],
                )
            )
        out.append("")
    return "\n".join(out)


def _q(s: dict[str, Any]) -> list[Any]:
    return [s["median"], s["p25"], s["p75"]]


def encoding(doc: dict[str, Any]) -> str:
    rows = []
    for key, entry in doc["single"].items():
        for compression, e in entry.items():
            if compression == "pillow_noargs":
                continue
            a, p = e["atelier"], e["pillow"]
            eq = e.get("pillow_equal_psnr")
            rows.append(
                [
                    key,
                    compression,
                    a["ms"],
                    a["kib"],
                    a["psnr_db"] or "lossless",
                    p["ms"],
                    p["kib"],
                    p["psnr_db"] or "lossless",
                    f"q{eq['quality']}: {eq['kib']} KiB, {eq['ms']} ms" + ("" if eq["reached"] else " (not reached)")
                    if eq
                    else None,
                ]
            )
    single = table(
        [
            "image",
            "compression",
            "Atelier ms",
            "KiB",
            "PSNR dB",
            "Pillow ms",
            "KiB",
            "PSNR dB",
            "Pillow at equal PSNR",
        ],
        rows,
    )
    batch = table(
        ["10 images", "encode_many ms", "Atelier loop ms", "Pillow loop ms"],
        [[k, v["encode_many"]["ms"], v["atelier_loop"]["ms"], v["pillow_loop"]["ms"]] for k, v in doc["batch"].items()],
    )
    return single + "\n\n" + batch + "\n"


def concurrency(doc: dict[str, Any]) -> str:
    rows = []
    for level, entry in doc["levels"].items():
        for server, r in entry.items():
            if server.startswith("ratio_"):
                continue
            lat = r["latency_s"]
            rows.append([level, server, r["images_per_s"], lat["median"], lat["p95"], r["mean_batch_size"]])
        for key, value in entry.items():
            if key.startswith("ratio_"):
                rows.append([level, f"ratio {key.removeprefix('ratio_images_per_s_')}", value, None, None, None])
    header = ["concurrent callers", "server", "images/s", "median s", "p95 s", "predictions per call"]
    return f"model: {doc['model']}\n\n" + table(header, rows) + "\n"


def proxy(doc: dict[str, Any]) -> str:
    out = []
    for name, scenario in doc["scenarios"].items():
        rows = []
        for level, row in scenario["levels"].items():
            for target, r in row.items():
                if target.startswith("ratios"):
                    continue
                rows.append(
                    [
                        level,
                        target,
                        r["throughput_rps"],
                        r["latency_ms"]["median"],
                        r["latency_ms"]["p95"],
                        r.get("added_latency_ms"),
                        r["server_cpu_ms_per_request"],
                    ]
                )
        out.append(f"**{name}**\n")
        out.append(
            table(["concurrency", "target", "req/s", "median ms", "p95 ms", "added ms", "server CPU ms/req"], rows)
        )
        ratios = [
            [level, key.removeprefix("ratios_"), *value.values()]
            for level, row in scenario["levels"].items()
            for key, value in row.items()
            if key.startswith("ratios_")
        ]
        if ratios:
            header = ["concurrency", "ratio", "throughput", "median latency", "added latency", "CPU/request"]
            out.append("\n" + table(header, ratios))
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("document", type=Path)
    doc = json.loads(parser.parse_args().document.read_text())
    renderers = (
        ("engine_overhead", engine_overhead),
        ("concurrency", concurrency),
        ("encoding", encoding),
        ("proxy", proxy),
    )
    for name, render in renderers:
        if name in doc and "error" not in doc[name]:
            print(f"## {name}\n\n{render(doc[name])}")


if __name__ == "__main__":
    main()
