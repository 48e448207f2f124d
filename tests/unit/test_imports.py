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
    "atelier.engines.catalog",
    "atelier.engines.registry",
    "atelier.jobs.runner",
    "atelier.jobs.blobs",
    "atelier.api.replicate.downloads",
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


def test_the_bucket_client_is_imported_only_for_a_bucket():
    """obstore loads when ATELIER_FILES_URL names a bucket and a file is touched, never for the data folder."""
    code = (
        "import sys, tempfile\n"
        "from pathlib import Path\n"
        "import atelier.app, atelier.cli, atelier.services, atelier.api.replicate.files\n"
        "from atelier.config import Settings\n"
        "from atelier.jobs.files import FileStore\n"
        "from atelier.jobs.store import Store\n"
        "folder = Path(tempfile.mkdtemp())\n"
        "store = Store(folder / 'atelier.db'); store.open()\n"
        "files = FileStore.from_settings(Settings(data_dir=folder), store)\n"
        "files.read(files.put(b'x', name='a.png', content_type='image/png', kind='upload').id)\n"
        "print('obstore' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"
