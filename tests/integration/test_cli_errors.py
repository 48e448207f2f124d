"""A newcomer's mistakes, made with the real ``atelier`` command: one line that says the fix, exit 2, no traceback."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_cli import atelier

pytestmark = pytest.mark.slow


def one_line(run: subprocess.CompletedProcess, status: int = 2) -> str:
    """The single line of stderr of a run that failed as a usage error should."""
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == status, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    return lines[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# -- 1. settings -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["generate", "a fox"], ["serve"]])
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"ATELIER_MAX_CONCURRENCY": "two"}, "error: ATELIER_MAX_CONCURRENCY: got 'two'; expected a whole number"),
        ({"ATELIER_BATCHING": "maybe"}, "error: ATELIER_BATCHING: got 'maybe'; expected true or false"),
        ({"ATELIER_ENGINE": "gpu"}, "error: ATELIER_ENGINE: got 'gpu'; allowed: local, openai"),
        ({"ATELIER_RETENTION": "1 hour"}, "error: ATELIER_RETENTION: got '1 hour'; use a duration such as '1h'"),
        ({"ATELIER_MATTING": "rembg"}, "error: ATELIER_MATTING: got 'rembg'; available: chroma"),
        ({"ATELIER_DEVICE": "gpu"}, "error: ATELIER_DEVICE: got 'gpu'; use cuda, cuda:N (the Nth GPU), mps"),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable(command, env, expected, tmp_path):
    run = atelier(*command, env={"ATELIER_DATA_DIR": str(tmp_path), **env})
    assert one_line(run).startswith(expected)


def test_several_bad_settings_are_a_line_each(tmp_path):
    run = atelier("serve", env={"ATELIER_MAX_CONCURRENCY": "two", "ATELIER_ENGINE": "gpu"})
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.splitlines() == [
        "error: ATELIER_ENGINE: got 'gpu'; allowed: local, openai",
        "error: ATELIER_MAX_CONCURRENCY: got 'two'; expected a whole number",
    ]


# -- 2. the device ---------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs the CPU-only build of torch")
def test_cuda_with_a_cpu_torch_says_which_torch_and_how_to_get_a_cuda_build(tiny_flux2, tmp_path):
    run = atelier("generate", "a fox", "--model-path", str(tiny_flux2), "-q", "-o", str(tmp_path),
                  env={"ATELIER_DEVICE": "cuda"})  # fmt: skip
    line = one_line(run)
    assert line.startswith(f"error: ATELIER_DEVICE: got 'cuda', but the installed torch {torch.__version__} is a CPU")
    assert (
        "pip install torch --index-url https://download.pytorch.org/whl/cu" in line and "unset ATELIER_DEVICE" in line
    )
    assert not list(tmp_path.iterdir())


# -- 3. the address --------------------------------------------------------------------------------------


def test_serve_on_a_busy_port_says_so_before_loading_anything(busy_port, tmp_path):
    run = atelier("serve", "--port", str(busy_port), env={"ATELIER_DATA_DIR": str(tmp_path / "data")})
    line = one_line(run)
    assert line.startswith(f"error: --port: port {busy_port} on 127.0.0.1 is taken")
    assert f"--port {busy_port + 1}" in line
    assert not (tmp_path / "data").exists()  # nothing was set up


def test_a_busy_port_from_the_environment_names_the_variable(busy_port, tmp_path):
    run = atelier("serve", env={"ATELIER_PORT": str(busy_port), "ATELIER_DATA_DIR": str(tmp_path)})
    assert one_line(run).startswith(f"error: ATELIER_PORT: port {busy_port} on 127.0.0.1 is taken")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--port", "99999"], "error: --port: got 99999; it must be at most 65535"),
        (["--port", "0"], "error: --port: got 0; it must be at least 1"),
        (["--port", "http"], "error: Invalid value for '--port': 'http' is not a valid integer."),
        (["--host", "192.0.2.1", "--port", "5999"], "error: --host: 192.0.2.1 is not an address of this machine"),
    ],
)
def test_an_address_that_cannot_work_is_one_line(args, expected, tmp_path):
    run = atelier("serve", *args, env={"ATELIER_DATA_DIR": str(tmp_path), "ATELIER_API_TOKENS": "t"})
    assert one_line(run).startswith(expected)


def test_a_data_folder_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    run = atelier("serve", "--data-dir", str(blocker / "data"), env={"ATELIER_PORT": str(free_port())})
    assert one_line(run).startswith(f"error: --data-dir: cannot create {blocker / 'data'}: Not a directory")


def test_a_damaged_database_is_one_line_before_the_server_starts(tmp_path):
    (tmp_path / "atelier.db").write_text("not a database")
    run = atelier("serve", "--data-dir", str(tmp_path), "--port", str(free_port()))
    line = one_line(run)
    assert line.startswith(f"error: --data-dir: {tmp_path / 'atelier.db'} cannot be read as a database (file is not")
    assert "restore it from a backup (docs/backups.md)" in line


@pytest.mark.parametrize("command", [["serve"], ["worker"]])
def test_a_database_server_that_does_not_answer_is_one_line_without_its_password(command, tmp_path):
    pytest.importorskip("psycopg")
    url = f"postgresql+psycopg://atelier:SECRETPW@127.0.0.1:{free_port()}/atelier"  # nothing listens there
    env = {"ATELIER_DATA_DIR": str(tmp_path), "ATELIER_DATABASE_URL": url, "ATELIER_PORT": str(free_port())}
    line = one_line(atelier(*command, env=env))
    assert line.startswith("error: ATELIER_DATABASE_URL: cannot use postgresql+psycopg://atelier:***@127.0.0.1:")
    assert "Connection refused" in line and "SECRETPW" not in line


# -- 4. the model folder ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["generate", "a fox"], ["serve"]])
def test_a_model_path_that_does_not_exist_says_so(command, tmp_path):
    missing = tmp_path / "no-such-model"
    run = atelier(*command, "--model-path", str(missing), env={"ATELIER_DATA_DIR": str(tmp_path)})
    assert one_line(run) == (
        f"error: --model-path: {missing} does not exist; give a folder saved with pipeline.save_pretrained()"
    )
    run = atelier(*command, env={"ATELIER_MODEL_PATH": str(missing), "ATELIER_DATA_DIR": str(tmp_path)})
    assert one_line(run).startswith(f"error: ATELIER_MODEL_PATH: {missing} does not exist")


def test_the_python_api_says_a_model_folder_does_not_exist(tmp_path):
    from atelier import Atelier
    from atelier.errors import ModelUnavailable

    with pytest.raises(ModelUnavailable, match=r"no-such-model does not exist; point --model-path at a folder"):
        Atelier(model_path=tmp_path / "no-such-model").generate("a fox")


# -- 6. flags and the environment ------------------------------------------------------------------------


def test_a_model_flag_beats_the_model_path_variable(tiny_flux2, tmp_path):
    run = atelier("generate", "a fox", "--model", "z-image-turbo", "-q", "-o", str(tmp_path),
                  env={"ATELIER_MODEL_PATH": str(tiny_flux2), "HF_HUB_CACHE": str(tmp_path / "empty")})  # fmt: skip
    # The flag won: the catalog model is asked for (and is not in this empty cache), not the folder served.
    assert one_line(run, status=1).startswith("error: model 'z-image-turbo' needs the weights of Tongyi-MAI/")


def test_a_model_path_flag_beats_the_model_variable(tiny_flux2, tmp_path):
    run = atelier("generate", "a fox", "--model-path", str(tiny_flux2), "-q", "-o", str(tmp_path),
                  env={"ATELIER_MODEL": "z-image-turbo", "ATELIER_ENGINE": "openai"})  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stderr.startswith("flux2-klein-4b: 1x 1024x1024 webp")


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--model", "z-image-turbo", "--model-path", "."], {},
         "error: --model and --model-path both choose the model; drop one"),
        ([], {"ATELIER_MODEL": "z-image-turbo", "ATELIER_MODEL_PATH": "."},
         "error: ATELIER_MODEL_PATH: ATELIER_MODEL and ATELIER_MODEL_PATH both choose the model; unset one"),
        ([], {"ATELIER_ENGINE": "openai", "ATELIER_MODEL_PATH": "."},
         "error: ATELIER_MODEL_PATH: ATELIER_ENGINE=openai sends requests to OpenAI, so the local model "
         "ATELIER_MODEL_PATH names would not be served; unset ATELIER_MODEL_PATH or ATELIER_ENGINE"),
        (["--model", "z-image-turbo", "--openai-api-key", "sk-caller"], {},
         "error: --openai-api-key sends the request to OpenAI, but --model names a local model; drop one"),
        ([], {"ATELIER_ENGINE": "openai"},
         "error: ATELIER_ENGINE=openai sends the request to OpenAI, and no key is set: pass --openai-api-key, "
         "or set OPENAI_API_KEY (or ATELIER_OPENAI_API_KEY_FILE)"),
    ],
)  # fmt: skip
def test_two_choices_of_model_are_an_error_saying_which_to_drop(args, env, expected, tmp_path):
    run = atelier("generate", "a fox", *args, env={"ATELIER_DATA_DIR": str(tmp_path), **env})
    assert one_line(run).startswith(expected)
    assert "sk-caller" not in run.stderr


def test_serve_refuses_two_choices_of_model_too(tmp_path):
    run = atelier("serve", env={"ATELIER_MODEL": "z-image-turbo", "ATELIER_MODEL_PATH": str(tmp_path)})
    assert one_line(run).startswith("error: ATELIER_MODEL_PATH: ATELIER_MODEL and ATELIER_MODEL_PATH both choose")


# -- 7. the command's own details ------------------------------------------------------------------------


def test_seed_minus_one_means_random(tiny_flux2, tmp_path):
    run = atelier("generate", "a fox", "--model-path", str(tiny_flux2), "--seed", "-1", "-q", "-o", str(tmp_path))
    assert run.returncode == 0, run.stderr
    seed = int(re.search(r"seed (\d+)", run.stderr).group(1))
    assert [Path(p).name for p in run.stdout.split()] == [f"a-fox-{seed}.webp"]
    assert one_line(atelier("generate", "a fox", "--seed", "-2")).startswith(
        "error: Invalid value for '--seed': -2 is not in the range -1<=x<=4294967295."
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["generate", ""], ["error: PROMPT: must not be empty; describe the image you want"]),
        (["generate", "a fox", "--image", "nope.png"],
         ["error: --image: nope.png does not exist; give an image file, an http(s) URL or a data: URI"]),
        (["edit", "a fox", "nope.png", "data:image/png;base64,!!"],
         ["error: nope.png does not exist; give an image file, an http(s) URL or a data: URI",
          "error: data:image/png;base64,!!: is a data: URI whose base64 data is invalid"]),
        (["edit", "a fox"], ["error: Missing argument 'IMAGES...'. (see 'atelier edit --help')"]),
    ],
)  # fmt: skip
def test_the_prompt_and_images_are_named_as_typed(tiny_flux2, args, expected, tmp_path):
    run = atelier(*args, "--model-path", str(tiny_flux2), cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.splitlines() == expected


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_model_runs(tiny_flux2, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    run = atelier("generate", "a fox", "--model-path", str(tiny_flux2), "-o", str(blocker / "out"))
    assert one_line(run).startswith(f"error: --out: cannot create {blocker / 'out'}: Not a directory")


def test_the_python_api_prints_no_loading_bars_and_names_files_as_the_cli_does(tiny_flux2, tmp_path):
    code = (
        "from atelier import Atelier\n"
        f"result = Atelier(model_path={str(tiny_flux2)!r}).generate('A lighthouse at dusk!', seed=7)\n"
        "print(*[p.name for p in result.save('out')])\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=240)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "a-lighthouse-at-dusk-7.webp"
    assert "%|" not in run.stderr and "Loading" not in run.stderr, run.stderr
    asked = code.replace(").generate(", ", progress_bars=True).generate(")
    shown = subprocess.run([sys.executable, "-c", asked], capture_output=True, text=True, cwd=tmp_path, timeout=240)
    assert shown.returncode == 0 and "Loading pipeline components" in shown.stderr, shown.stderr


def test_an_unexpected_failure_is_one_line_pointing_at_debug(monkeypatch, capsys):
    import importlib

    from atelier import cli

    generate = importlib.import_module("atelier.cli.generate")  # the module, not the command of that name

    def broken(*args, **kwargs):
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(generate, "run", broken)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "a fox"])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: RuntimeError: something nobody expected (a bug: rerun with --debug for the traceback)"
    ]
    with pytest.raises(RuntimeError):
        cli.main(["--debug", "generate", "a fox"])
