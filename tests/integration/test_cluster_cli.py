"""``atelier worker`` and ``atelier serve --no-worker`` share jobs through PostgreSQL: without it, one line."""

from __future__ import annotations

import pytest
from test_cli import atelier

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("command", "name"), [(["worker"], "atelier worker"), (["serve", "--no-worker"], "atelier serve --no-worker")]
)
def test_a_process_of_a_cluster_without_postgresql_is_one_line_naming_the_setting(command, name, tmp_path):
    run = atelier(*command, env={"ATELIER_DATA_DIR": str(tmp_path)})
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip() == (
        f"error: ATELIER_DATABASE_URL: {name} shares its jobs with other processes through PostgreSQL; set "
        "ATELIER_DATABASE_URL (e.g. postgresql+psycopg://atelier@db:5432/atelier; docs/scaling.md)"
    )


def test_the_worker_takes_the_same_model_options_as_serve():
    run = atelier("worker", "--help")
    assert run.returncode == 0
    for option in ("--model ", "--model-path", "--data-dir"):
        assert option in run.stdout
