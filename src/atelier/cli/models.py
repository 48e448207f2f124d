"""``atelier models``: the catalog, and which weights are already in the local Hugging Face cache."""

from __future__ import annotations

import click

from atelier.engines.catalog import CATALOG, DEFAULT_MODEL, Variant


@click.command()
def models() -> None:
    """List the model catalog and what is installed locally."""
    rows = [("MODEL", "EDITS", "MASKS", "STEPS", "LICENCE", "INSTALLED", "REPOS")]
    for spec in CATALOG.values():
        edits = f"up to {spec.max_input_images}" if spec.can_edit else "no"
        installed = "yes" if all(is_cached(v) for v in spec.variants) else "no"
        name = spec.name + (" (default)" if spec.name == DEFAULT_MODEL else "") + (" [gpu]" if spec.gpu_only else "")
        repos = ", ".join(v.repo for v in spec.variants)
        masks = "yes" if spec.can_inpaint else "no"  # inpainting: an OpenAI edits mask
        rows.append((name, edits, masks, str(spec.quality["auto"].steps), spec.licence, installed, repos))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def is_cached(variant: Variant) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(variant.repo, "model_index.json", revision=variant.revision)
    except Exception:  # an unreadable cache is "not installed", not a crash
        return False
    return isinstance(found, str)
