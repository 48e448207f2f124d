"""``atelier backup``: a copy taken while the server runs is a data folder a server can start from."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

from test_cli import atelier

from doors import REPLICATE_CREATE, serve


async def test_a_live_backup_restores_predictions_files_and_signed_urls(tmp_path: Path) -> None:
    data, copy = tmp_path / "data", tmp_path / "backup"
    async with serve(data) as doors:
        created = await doors.client.post(
            REPLICATE_CREATE, json={"input": {"prompt": "a red square", "number_of_images": 2}},
            headers={"Prefer": "wait"},
        )  # fmt: skip
        prediction = created.json()
        assert prediction["status"] == "succeeded", prediction
        # The server is still running, its database open in WAL mode with recent writes in the log.
        run = await asyncio.to_thread(atelier, "backup", str(copy), env={"ATELIER_DATA_DIR": str(data)})
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith(f"backed up {data} to {copy}: the database and ")
        originals = [(await doors.client.get(url)).content for url in prediction["output"]]

    # the signing key is in the database (server_secrets), so the database's copy carries it
    assert sorted(p.name for p in copy.glob("*.key")) == sorted(p.name for p in data.glob("*.key"))
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in [*copy.glob("*.key"), copy / "atelier.db"])
    async with serve(copy) as restored:
        again = (await restored.client.get(f"/v1/predictions/{prediction['id']}")).json()
        assert (again["status"], again["output"]) == ("succeeded", prediction["output"])
        for url, original in zip(prediction["output"], originals, strict=True):
            # the signing key came along: the signed URLs handed out before the backup still work
            response = await restored.client.get(url)
            assert response.status_code == 200 and response.content == original


def test_backup_refuses_what_is_not_a_data_folder_or_would_overwrite(tmp_path: Path) -> None:
    run = atelier("backup", str(tmp_path / "copy"), "--data-dir", str(tmp_path / "nothing"))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert (
        run.stderr.strip()
        == f"error: --data-dir: {tmp_path / 'nothing'} has no atelier.db; is it Atelier's data folder?"
    )
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "atelier.db").write_bytes(b"")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "something").write_text("keep me")
    run = atelier("backup", str(tmp_path / "taken"), env={"ATELIER_DATA_DIR": str(tmp_path / "data")})
    assert run.returncode == 2
    assert run.stderr.strip() == f"error: DEST: {tmp_path / 'taken'} exists and is not an empty folder; name a new one"
    assert (tmp_path / "taken" / "something").read_text() == "keep me"
