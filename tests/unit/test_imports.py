"""Heavy imports are lazy: the CLI, the contract and a server with a non-diffusers engine never load torch."""

import subprocess
import sys

LIGHT_MODULES = [
    "atelier",
    "atelier.cli",
    "atelier.request",
    "atelier.sizes",
    "atelier.config",
    "atelier.moderation",
    "atelier.imaging.encode",
    "atelier.imaging.inputs",
    "atelier.imaging.matting",
    "atelier.imaging.masks",
    "atelier.engines.inpainting",
    "atelier.engines.catalog",
    "atelier.engines.registry",
    "atelier.jobs.runner",
    "atelier.app",
]


def test_light_modules_do_not_import_torch_or_diffusers():
    code = (
        "import importlib, sys\n"
        f"for name in {LIGHT_MODULES!r}: importlib.import_module(name)\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == ""


def test_importing_has_no_side_effects_on_logging():
    code = "import logging, atelier.app, atelier.cli; print(len(logging.getLogger().handlers))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "0"
