"""Heavy imports are lazy: the CLI, the contract and a server with a non-diffusers engine never load torch."""

import ast
import subprocess
import sys
from pathlib import Path

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


SRC = Path(__file__).parents[2] / "src"
# What atelier.config may import from Atelier: leaves that never import the settings back.
CONFIG_IMPORTS = {
    "atelier.errors",
    "atelier.setting_parsers",
    "atelier.engines.catalog",
    "atelier.engines.tuning",  # the names of the attention backends, to check ATELIER_ATTENTION
    "atelier.imaging.matting",
}


def _atelier_imports(module: str) -> set[str]:
    """The atelier modules ``module`` imports anywhere in its file (inside functions too, not TYPE_CHECKING)."""
    parts = module.split(".")
    path = SRC.joinpath(*parts).with_suffix(".py")
    if not path.exists():
        path = SRC.joinpath(*parts, "__init__.py")
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for guard in ast.walk(tree)
        if isinstance(guard, ast.If) and "TYPE_CHECKING" in ast.unparse(guard.test)
        for stmt in guard.body
        for node in ast.walk(stmt)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("atelier"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("atelier")}
    return found


def test_config_is_a_leaf_no_import_cycle_runs_through_it():
    assert _atelier_imports("atelier.config") <= CONFIG_IMPORTS
    seen: set[str] = set()
    todo = list(CONFIG_IMPORTS)
    while todo:  # everything config reaches, transitively, at run time
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += _atelier_imports(module)
    assert "atelier.config" not in seen, "a module atelier.config imports imports it back"
    assert not {"atelier.fetch", "atelier.jobs.limits"} & seen


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


# The text check and provenance: their libraries load when a job is read or an image signed, never before.
OPTIONAL_MODULES = [
    *LIGHT_MODULES,
    "atelier.prompt_text",
    "atelier.imaging.ocr",
    "atelier.engines.text_check",
    "atelier.imaging.provenance",
    "atelier.imaging.dev_cert",
    "atelier.cli.c2pa",
    "atelier.studio",
]


def test_ocr_and_signing_libraries_load_only_when_used():
    code = (
        "import importlib, sys\n"
        f"for name in {OPTIONAL_MODULES!r}: importlib.import_module(name)\n"
        "heavy = ('rapidocr_onnxruntime', 'onnxruntime', 'cv2', 'c2pa', 'cryptography')\n"
        "print(','.join(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == ""
