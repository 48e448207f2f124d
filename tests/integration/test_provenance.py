"""Content Credentials: outputs carry a signed C2PA manifest, read back with c2pa-python's own ``Reader``, when
``ATELIER_C2PA_CERT``/``ATELIER_C2PA_KEY`` are set; outputs are byte for byte today's when they are not; a bad or
expired certificate is one line at start-up. Over the in-process app (``doors.serve``), the Python API, and the
real ``atelier`` command for the start-up errors and ``atelier c2pa dev-cert``.
"""

from __future__ import annotations

import base64
import io
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from atelier import __version__
from atelier.config import Settings
from atelier.engines.base import CancelToken, Job, OutputImage, Result
from atelier.errors import SettingsError
from atelier.imaging import metadata
from atelier.imaging.provenance import TRAINED_ALGORITHMIC_MEDIA, check, read_manifest, stamp
from atelier.request import ImageRequest
from atelier.studio import Atelier
from doors import BASE, REPLICATE_CREATE, data_uri, serve
from fakes import FakeEngine

pytest.importorskip("c2pa")

from atelier.imaging.dev_cert import CERT_NAME, KEY_NAME, write_dev_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    made = write_dev_pair(tmp_path_factory.mktemp("c2pa"))
    return {"c2pa_cert": made.cert, "c2pa_key": made.key}


async def kept(doors: Any, **input: Any) -> tuple[dict[str, Any], list[bytes]]:
    body = {"input": {"prompt": "a lighthouse at dusk", "seed": 11, **input}}
    prediction = (await doors.client.post(REPLICATE_CREATE, json=body, headers={"Prefer": "wait"})).json()
    assert prediction["status"] == "succeeded", prediction
    return prediction, [(await doors.client.get(url.removeprefix(BASE))).content for url in prediction["output"]]


def actions(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    [assertion] = [a for a in manifest["assertions"] if a["label"].startswith("c2pa.actions")]
    return assertion["data"]["actions"]


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
async def test_each_format_carries_a_valid_signed_manifest(tmp_path: Path, pair: dict[str, Path], fmt: str) -> None:
    async with serve(tmp_path, **pair) as doors:
        _, files = await kept(doors, output_format=fmt, number_of_images=2)
    for data in files:
        manifest, state = read_manifest(data, fmt)
        assert manifest is not None and state == "Valid"  # signed and intact; the development CA is not trusted
        assert manifest["claim_generator_info"][0]["name"] == "Atelier"
        assert manifest["claim_generator_info"][0]["version"] == __version__
        [created] = actions(manifest)
        assert created["action"] == "c2pa.created" and created["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
        assert created["softwareAgent"]["name"] == "fake"  # the model
        assert "DEVELOPMENT ONLY" in manifest["signature_info"]["common_name"]
        assert not manifest.get("ingredients")
        assert "thumbnail" not in manifest  # a thumbnail would add 100 KB to 1 MB to each file
        with Image.open(io.BytesIO(data)) as image:  # still the image, with its generation parameters
            image.load()
            assert image.format.lower() == fmt and image.size == (64, 64)
            if fmt == "png":
                assert "Seed: 11" in image.info["parameters"] or "Seed: 12" in image.info["parameters"]


async def test_an_ingredient_keeps_its_own_format(tmp_path: Path, pair: dict[str, Path]) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, "JPEG")
    async with serve(tmp_path, **pair) as doors:
        _, [data] = await kept(
            doors,
            output_format="png",
            input_images=["data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()],
        )
    manifest, _ = read_manifest(data, "png")
    assert manifest is not None
    assert [(i["title"], i["format"]) for i in manifest["ingredients"]] == [("input_images[0]", "image/jpeg")]


async def test_signing_without_the_generation_parameters(tmp_path: Path, pair: dict[str, Path]) -> None:
    async with serve(tmp_path, metadata=False, **pair) as doors:
        _, [data] = await kept(doors, output_format="png")
    manifest, state = read_manifest(data, "png")
    assert state == "Valid" and manifest is not None
    with Image.open(io.BytesIO(data)) as image:
        assert "parameters" not in image.info  # ATELIER_METADATA=false still means no parameters


async def test_the_openai_door_returns_signed_images_too(tmp_path: Path, pair: dict[str, Path]) -> None:
    async with serve(tmp_path, **pair) as doors:
        response = await doors.client.post("/v1/images/generations", json={"prompt": "a fox", "output_format": "jpeg"})
    assert response.status_code == 200, response.text
    manifest, state = read_manifest(base64.b64decode(response.json()["data"][0]["b64_json"]), "jpeg")
    assert state == "Valid" and manifest is not None and actions(manifest)[0]["action"] == "c2pa.created"


async def test_an_edit_names_its_input_images_as_ingredients(tmp_path: Path, pair: dict[str, Path]) -> None:
    inputs = [_png((10, 120, 200)), _png((200, 120, 10))]
    async with serve(tmp_path, **pair) as doors:
        _, [data] = await kept(doors, input_images=[data_uri(i) for i in inputs])
    manifest, state = read_manifest(data, "png")
    assert manifest is not None and state == "Valid"
    ingredients = manifest["ingredients"]
    assert [(i["title"], i["relationship"], i["format"]) for i in ingredients] == [
        ("input_images[0]", "parentOf", "image/png"),
        ("input_images[1]", "componentOf", "image/png"),
    ]
    assert not any("thumbnail" in i for i in ingredients)
    opened, edited = actions(manifest)
    assert opened["action"] == "c2pa.opened" and edited["action"] == "c2pa.edited"
    assert edited["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA and edited["softwareAgent"]["name"] == "fake"


async def test_without_a_signer_outputs_are_byte_for_byte_todays(tmp_path: Path) -> None:
    async with serve(tmp_path) as doors:
        _, [data] = await kept(doors, output_format="jpeg")
    # Today's bytes: the engine's image with the generation parameters, nothing else.
    request = ImageRequest(prompt="a lighthouse at dusk", seed=11, output_format="jpeg")
    job = Job(id="x", request=request, seed=11)
    result = FakeEngine().generate(job, progress=lambda e: None, cancel=CancelToken())
    assert data == metadata.annotate(result, job).images[0].data
    assert read_manifest(data, "jpeg") == (None, None)
    assert stamp(result, job, Settings()) is result  # not configured: not even a copy


def test_the_python_api_signs_too_and_names_decoded_inputs(tmp_path: Path, pair: dict[str, Path]) -> None:
    source = tmp_path / "photo.png"
    source.write_bytes(_png((30, 30, 30)))
    studio = Atelier(settings=Settings(data_dir=tmp_path, **pair), engine=FakeEngine())
    [path] = studio.edit("make it brighter", [source], output_format="webp").save(tmp_path / "out")
    manifest, state = read_manifest(path.read_bytes(), "webp")
    assert state == "Valid" and manifest is not None
    assert [i["title"] for i in manifest["ingredients"]] == ["input_images[0]"]


def test_an_upstream_image_with_its_own_manifest_keeps_it_as_an_ingredient(pair: dict[str, Path]) -> None:
    settings = Settings(**pair)
    job = Job(id="x", request=ImageRequest(prompt="a fox"), seed=1)
    upstream = stamp(_result(_png((1, 2, 3))), job, settings)  # stands in for an upstream's signed output
    again, state = read_manifest(stamp(_result(upstream.images[0].data), job, settings).images[0].data, "png")
    assert state == "Valid" and again is not None
    assert [(i["title"], i["relationship"]) for i in again["ingredients"]] == [("upstream output", "parentOf")]


# -- the signer's certificate, checked at start-up ------------------------------------------------------------


def test_a_c2pa_build_that_cannot_sign_a_format_is_refused_at_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import c2pa

    made = write_dev_pair(tmp_path / "fresh")  # a pair no earlier check has cached
    everything = c2pa.Builder.get_supported_mime_types()
    monkeypatch.setattr(c2pa.Builder, "get_supported_mime_types", lambda: [m for m in everything if "webp" not in m])
    with pytest.raises(SettingsError) as caught:
        check(Settings(c2pa_cert=made.cert, c2pa_key=made.key))
    assert "cannot sign webp outputs" in caught.value.problems[0].message


def test_a_certificate_that_expires_while_serving_fails_the_prediction_saying_so(
    pair: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from atelier.errors import EngineError
    from atelier.imaging import provenance

    settings = Settings(**pair)
    check(settings)

    class Later(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
            return datetime.now(tz) + timedelta(days=400)

    monkeypatch.setattr(provenance, "datetime", Later)
    job = Job(id="x", request=ImageRequest(prompt="a fox"), seed=1)
    with pytest.raises(EngineError, match=r"ATELIER_C2PA_CERT\) expired at .*; the operator must renew it"):
        stamp(_result(_png((1, 1, 1))), job, settings)


def test_a_good_pair_passes_the_check(pair: dict[str, Path]) -> None:
    credentials = check(Settings(**pair))
    assert credentials is not None and credentials.alg == "es256"
    assert check(Settings()) is None


@pytest.mark.parametrize(
    ("case", "variable", "says"),
    [
        ("expired", "ATELIER_C2PA_CERT", "expired on"),
        ("not yet valid", "ATELIER_C2PA_CERT", "is not valid before"),
        ("not pem", "ATELIER_C2PA_CERT", "is not a PEM certificate"),
        ("bad key", "ATELIER_C2PA_KEY", "is not an unencrypted PEM private key"),
        ("other key", "ATELIER_C2PA_KEY", "is not the key of the certificate"),
        ("missing file", "ATELIER_C2PA_CERT", "No such file"),
        ("only cert", "ATELIER_C2PA_KEY", "not set, but ATELIER_C2PA_CERT is"),
        ("self-signed", "ATELIER_C2PA_CERT", "was refused by c2pa"),
    ],
)
def test_a_bad_signer_is_a_settings_error_naming_the_variable(
    tmp_path: Path, pair: dict[str, Path], case: str, variable: str, says: str
) -> None:
    settings = _bad(tmp_path, pair, case)
    with pytest.raises(SettingsError) as caught:
        check(settings)
    [problem] = caught.value.problems
    assert problem.field == variable and says in problem.message, problem.message


@pytest.mark.slow
@pytest.mark.parametrize("command", [["serve"], ["generate", "a fox", "--model-path", "."]])
def test_a_bad_certificate_stops_the_start_in_one_line(tmp_path: Path, pair: dict[str, Path], command: list[str]):
    from test_cli import atelier
    from test_cli_errors import free_port, one_line

    settings = _bad(tmp_path, pair, "expired")
    env = {
        "ATELIER_DATA_DIR": str(tmp_path / "data"),
        "ATELIER_API_TOKENS": "token",  # no "open to local callers" note before the error
        "ATELIER_PORT": str(free_port()),
        "ATELIER_C2PA_CERT": str(settings.c2pa_cert),
        "ATELIER_C2PA_KEY": str(settings.c2pa_key),
    }
    line = one_line(atelier(*command, env=env, cwd=tmp_path))
    assert line.startswith("error: ATELIER_C2PA_CERT: ") and "expired on" in line, line


def test_dev_cert_writes_a_labelled_pair_and_keeps_the_key_private(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from atelier.cli import cli

    runner = CliRunner()
    run = runner.invoke(cli, ["c2pa", "dev-cert", str(tmp_path / "keys")])
    assert run.exit_code == 0, run.output
    assert "DEVELOPMENT-ONLY" in run.output and f"ATELIER_C2PA_CERT={tmp_path / 'keys' / CERT_NAME}" in run.output
    assert stat.S_IMODE((tmp_path / "keys" / KEY_NAME).stat().st_mode) == 0o600
    settings = Settings(c2pa_cert=tmp_path / "keys" / CERT_NAME, c2pa_key=tmp_path / "keys" / KEY_NAME)
    assert "DEVELOPMENT ONLY" in check(settings).subject  # type: ignore[union-attr]
    again = runner.invoke(cli, ["c2pa", "dev-cert", str(tmp_path / "keys")])
    assert again.exit_code == 2 and "--force" in again.output


def test_c2pa_show_prints_the_manifest(tmp_path: Path, pair: dict[str, Path]) -> None:
    from click.testing import CliRunner

    from atelier.cli import cli

    job = Job(id="x", request=ImageRequest(prompt="a fox"), seed=1)
    signed = tmp_path / "signed.png"
    signed.write_bytes(stamp(_result(_png((9, 9, 9))), job, Settings(**pair)).images[0].data)
    shown = CliRunner().invoke(cli, ["c2pa", "show", str(signed)])
    assert (
        shown.exit_code == 0
        and '"validation_state": "Valid"' in shown.output
        and TRAINED_ALGORITHMIC_MEDIA in shown.output
    )
    plain = tmp_path / "plain.png"
    plain.write_bytes(_png((9, 9, 9)))
    assert CliRunner().invoke(cli, ["c2pa", "show", str(plain)]).exit_code == 1


# -- helpers ------------------------------------------------------------------------------------------------


def _png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), color).save(buffer, "PNG")
    return buffer.getvalue()


def _result(data: bytes) -> Result:
    return Result([OutputImage(data, "png", 48, 48, seed=1)], "fake", "fake", rendered_size="48x48", size="48x48")


def _bad(tmp_path: Path, pair: dict[str, Path], case: str) -> Settings:
    cert, key = pair["c2pa_cert"], pair["c2pa_key"]
    now = datetime.now(UTC)
    if case == "expired":
        made = write_dev_pair(tmp_path / case, days=5, now=now - timedelta(days=30))
        cert, key = made.cert, made.key
    elif case == "not yet valid":
        made = write_dev_pair(tmp_path / case, days=5, now=now + timedelta(days=2))
        cert, key = made.cert, made.key
    elif case == "not pem":
        cert = tmp_path / "cert.pem"
        cert.write_text("hello")
    elif case == "bad key":
        key = tmp_path / "key.pem"
        key.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    elif case == "other key":
        key = write_dev_pair(tmp_path / case).key
    elif case == "missing file":
        cert = tmp_path / "nowhere.pem"
    elif case == "only cert":
        return Settings(c2pa_cert=cert)
    elif case == "self-signed":  # what a quick `openssl req -x509` makes: c2pa refuses it as a signer
        cert, key = _self_signed(tmp_path)
    return Settings(c2pa_cert=cert, c2pa_key=key)


def _self_signed(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self-signed")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=9))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = folder / "self-cert.pem", folder / "self-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    key_path.write_bytes(pem)
    return cert_path, key_path
