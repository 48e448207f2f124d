"""Test-wide settings: never touch the Hugging Face hub, never use the user's data folder."""

import os

# Set before anything imports huggingface_hub: a hub lookup without these hangs instead of failing.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.pop("OPENAI_API_KEY", None)
os.environ.pop("ATELIER_MODEL_PATH", None)
# No disk reserve (8 MiB, really allocated) in every test's data folder: hundreds of apps start per run.
# The disk-full tests set their own (tests/integration/test_disk_full.py).
os.environ["ATELIER_DISK_RESERVE_BYTES"] = "0"

from pathlib import Path

import pytest

# Which tiny family stands in for each catalog repo (tests/tiny_models.py builds them).
CATALOG_FAMILIES = {
    "black-forest-labs/FLUX.2-klein-4B": "flux2-klein",
    "Qwen/Qwen-Image-2512": "qwen-image",
    "Qwen/Qwen-Image-Edit-2511": "qwen-image-edit-plus",
    "Tongyi-MAI/Z-Image-Turbo": "z-image",
}


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of tiny real pipelines, one sub-folder per family, built once per test session."""
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_flux2(tiny_root: Path) -> Path:
    from tiny_models import tiny_model_dir

    return tiny_model_dir("flux2-klein", tiny_root)


@pytest.fixture(scope="session")
def hub_cache_dir(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face hub cache holding every catalog repo as a tiny real pipeline."""
    from tiny_models import install_in_hub_cache, tiny_model_dir

    cache = tmp_path_factory.mktemp("hf-cache")
    for repo, family in CATALOG_FAMILIES.items():
        install_in_hub_cache(tiny_model_dir(family, tiny_root), repo, cache)
    return cache


@pytest.fixture
def hub_cache(hub_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point this process's hub lookups at the tiny cache (huggingface_hub reads the constant per call)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache_dir))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache_dir))
    return hub_cache_dir


@pytest.fixture(scope="session")
def standin_server():
    """A stand-in for OpenAI's Images API over real HTTP on loopback (tests/openai_standin.py)."""
    from openai_standin import start_standin

    server = start_standin()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto, loopback, offline) for the bucket tests (tests/s3.py)."""
    pytest.importorskip("obstore", reason="the bucket tests need obstore: pip install 'atelier[s3]'")
    pytest.importorskip("moto.server", reason="the bucket tests need moto's server: pip install 'moto[server]'")
    from s3 import start_s3

    server = start_s3()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3_server):
    """A fresh, empty bucket on the session's S3 server."""
    return s3_server.bucket()


@pytest.fixture
def openai_standin(standin_server):
    standin_server.reset()
    yield standin_server
    assert not standin_server.errors, standin_server.errors


@pytest.fixture(scope="session")
def pg_cluster():
    """A throwaway PostgreSQL cluster for the whole session (tests/pg.py); skips without the binaries."""
    from pg import PgCluster, find_bindir, why_unavailable

    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    bindir = find_bindir()
    assert bindir is not None
    cluster = PgCluster(bindir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def pg_url(pg_cluster) -> str:
    """The SQLAlchemy URL of the session cluster's ``postgres`` database (make your own databases in it)."""
    return pg_cluster.url()


@pytest.fixture
def pg_database(pg_cluster) -> str:
    """The SQLAlchemy URL of a fresh, empty database of its own for this test."""
    return pg_cluster.create_database()
