"""Secrets every process shares (the file-URL signing key, webhook secrets) live in the store or come from
ATELIER_SECRET_KEY, never from one process's folder; an install from before keeps its keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import subprocess
import sys
from pathlib import Path

import pytest

from atelier.config import load_settings
from atelier.errors import SettingsError
from atelier.jobs.files import FileStore
from atelier.jobs.store import Store

OLD_KEY = base64.b64encode(b"an existing install's signing key").decode()
OLD_WEBHOOK = "whsec_" + base64.b64encode(b"an existing install's webhook key").decode()
SECRET_KEY = "k" * 40

SIGN_ELSEWHERE = (
    "import sys; from pathlib import Path; from atelier.jobs.store import Store; from atelier.jobs.files import FileStore\n"
    "store = Store(sys.argv[1]).open()\n"
    "files = FileStore(Path(sys.argv[2]) / 'files', store, secrets_dir=Path(sys.argv[2]))\n"
    "print(files.sign('afileid'), files.webhook_secret(None), files.webhook_secret('tok'))\n"
    "store.close()\n"
)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    return tmp_path / "atelier.db" if request.param == "sqlite" else request.getfixturevalue("pg_database")


def old_signature(file_id: str) -> str:
    """What a server from before signed with ``OLD_KEY`` (HMAC-SHA256 over ``file:<id>``, 128 bits)."""
    digest = hmac.new(base64.b64decode(OLD_KEY), b"file:" + file_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:16]).decode().rstrip("=")


def test_two_machines_on_one_postgresql_database_verify_each_others_urls(pg_database: str, tmp_path: Path) -> None:
    store = Store(pg_database).open()
    here = FileStore(tmp_path / "here" / "files", store, secrets_dir=tmp_path / "here")
    run = subprocess.run(  # another process, with a data folder of its own: only the database is shared
        [sys.executable, "-c", SIGN_ELSEWHERE, pg_database, str(tmp_path / "there")],
        capture_output=True, text=True, timeout=120, check=False, env=os.environ,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    signature, webhook, token_webhook = run.stdout.split()
    assert here.verify("afileid", signature)
    assert here.webhook_secret(None) == webhook and here.webhook_secret("tok") == token_webhook
    assert not here.verify("anotherid", signature)
    assert not any((tmp_path / "there").glob("*.key")) and not any((tmp_path / "here").glob("*.key"))
    store.close()


def test_file_stores_on_one_database_share_every_secret(database: str | Path, tmp_path: Path) -> None:
    store = Store(database).open()
    one = FileStore(tmp_path / "a" / "files", store, secrets_dir=tmp_path / "a")
    other = FileStore(tmp_path / "b" / "files", store, secrets_dir=tmp_path / "b")
    assert other.verify("f1", one.sign("f1")) and one.verify("f2", other.sign("f2"))
    assert one.webhook_secret(None) == other.webhook_secret(None)
    assert one.webhook_secret(None).startswith("whsec_")
    assert one.webhook_secret("tok") == other.webhook_secret("tok") != one.webhook_secret("other")
    store.close()


def test_an_install_from_before_keeps_its_keys(database: str | Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "file-signing.key").write_text(OLD_KEY + "\n")
    (data / "webhook.key").write_text(OLD_WEBHOOK)
    store = Store(database).open()
    files = FileStore(data / "files", store, secrets_dir=data)
    assert files.verify("f1", old_signature("f1"))  # a URL handed out before the upgrade still works
    assert files.webhook_secret(None) == OLD_WEBHOOK
    elsewhere = FileStore(tmp_path / "elsewhere" / "files", store, secrets_dir=tmp_path / "elsewhere")
    assert elsewhere.verify("f1", old_signature("f1"))  # now from the store, for every process
    assert elsewhere.webhook_secret(None) == OLD_WEBHOOK
    store.close()


def test_atelier_secret_key_signs_alike_on_separate_databases(tmp_path: Path) -> None:
    stores = [Store(tmp_path / f"{name}.db").open() for name in ("one", "two")]
    one, two = (FileStore(tmp_path / str(i), s, secret_key=SECRET_KEY) for i, s in enumerate(stores))
    assert two.verify("f1", one.sign("f1"))
    unkeyed = FileStore(tmp_path / "unkeyed", stores[0])
    assert not unkeyed.verify("f1", one.sign("f1"))  # the key, not the database, decides
    for store in stores:
        store.close()


def test_a_short_secret_key_is_refused_without_being_repeated() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"secret_key": "short-and-guessable"})
    assert info.value.problems[0].field == "ATELIER_SECRET_KEY"
    assert "short-and-guessable" not in str(info.value)
    assert load_settings({"secret_key": SECRET_KEY}).secret_key is not None
