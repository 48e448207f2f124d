"""Content Credentials: a signed C2PA manifest in every output image, when the operator configures a signer.

* **When.** ``ATELIER_C2PA_CERT`` (PEM: the signing certificate, then the certificates that issued it)
  and ``ATELIER_C2PA_KEY`` (PEM private key) both set. Unset, nothing here runs and the outputs are
  byte for byte what they were. ``atelier c2pa dev-cert DIR`` writes a development pair (``dev_cert``).
* **What.** One manifest per image, signed with ``c2pa-python``: the claim generator (Atelier and its
  version), one action with the IPTC digital source type ``trainedAlgorithmicMedia`` and the model as
  its software agent — ``c2pa.created`` for a new image; for an edit, ``c2pa.opened`` of the first input
  image (ingredient ``parentOf``) then ``c2pa.edited``, the other input images as ``componentOf``
  ingredients. An image that already carries a manifest (an upstream's, such as OpenAI's) keeps it as
  a ``parentOf`` ingredient, so its history is not lost. No prompt, key or user goes in the manifest.
* **Where.** Last, after the generation parameters are written (``imaging.metadata``): the manifest
  hashes the file as delivered. It adds about 3 KB and a few milliseconds per image: no thumbnail. png, jpeg and webp are all signed (``FORMATS``; start-up refuses a
  c2pa build that cannot sign one of them).
* **Checked at start-up** (``check``): both files readable PEM, the key the certificate's, the
  certificate valid now, and one trial signature, so a bad or expired certificate is one line naming
  the variable (``SettingsError``) before any request — never a failure on every output later.
  The credentials are read once per process (``credentials``; cached by path and modification time).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atelier.errors import EngineError, FieldProblem, SettingsError

if TYPE_CHECKING:
    from atelier.config import Settings
    from atelier.engines.base import Job, OutputImage, Result

log = logging.getLogger(__name__)

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
CERT_VARIABLE, KEY_VARIABLE = "ATELIER_C2PA_CERT", "ATELIER_C2PA_KEY"
C2PA_EXTRA = "pip install 'atelier[c2pa]'"
ReadFile = Callable[[str], bytes]  # a stored file's bytes by id (FileStore.read)


@dataclass(frozen=True)
class Credentials:
    """A checked signing pair: the certificate chain and key as PEM, and the algorithm the key signs with."""

    chain: bytes
    key: bytes
    alg: str  # es256 | es384 | es512 | ps256 | ed25519
    subject: str
    not_after: datetime


@dataclass(frozen=True)
class Ingredient:
    title: str
    data: bytes
    mime: str


def configured(settings: Settings) -> bool:
    return settings.c2pa_cert is not None or settings.c2pa_key is not None


def check(settings: Settings) -> Credentials | None:
    """At start-up: the credentials, checked (``SettingsError`` naming the variable); None when unset."""
    if not configured(settings):
        return None
    return credentials(settings)


def credentials(settings: Settings) -> Credentials:
    cert, key = settings.c2pa_cert, settings.c2pa_key
    if cert is None or key is None:
        missing, given = (CERT_VARIABLE, KEY_VARIABLE) if cert is None else (KEY_VARIABLE, CERT_VARIABLE)
        raise SettingsError(
            FieldProblem(missing, f"not set, but {given} is; set both to sign outputs (or neither)", "missing")
        )
    return _load(Path(cert), Path(key), _mtime(cert, CERT_VARIABLE), _mtime(key, KEY_VARIABLE))


def stamp(result: Result, job: Job, settings: Settings, read_file: ReadFile | None = None) -> Result:
    """``result`` with a signed manifest in each image; ``result`` itself when provenance is not configured.

    ``read_file`` gives the bytes of a job's stored input images (the server's ``FileStore.read``); without
    it, decoded input images (the Python API's) go in as png.
    """
    if not configured(settings):
        return result
    import c2pa

    creds = credentials(settings)
    if datetime.now(UTC) >= creds.not_after:  # expired since start-up: say so, rather than c2pa's refusal
        when = creds.not_after.isoformat(timespec="seconds")
        raise EngineError(
            f"the C2PA signing certificate ({CERT_VARIABLE}) expired at {when}; the operator must renew it"
        )
    ingredients = _ingredients(job, read_file)
    try:
        images = [
            replace(image, data=sign(image, creds, model=result.model, ingredients=ingredients))
            for image in result.images
        ]
    except c2pa.C2paError as exc:
        raise EngineError(f"the outputs could not be signed (C2PA): {exc}") from exc
    return replace(result, images=images)


def sign(image: OutputImage, creds: Credentials, *, model: str, ingredients: Sequence[Ingredient] = ()) -> bytes:
    """``image``'s bytes with a signed manifest (see the module docstring)."""
    import c2pa

    mime = FORMATS[image.format]
    upstream = _has_manifest(image.data, mime)
    parts = ([Ingredient("upstream output", image.data, mime)] if upstream else []) + list(ingredients)
    # No thumbnail in the manifest: the image is its own preview, and c2pa's would add 100 KB (jpeg) to 1 MB
    # (webp, lossless) to every file and 20x the signing time (bench/ocr.py).
    context = c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}}})
    builder = c2pa.Builder.from_json(manifest(model, parts, upstream=upstream), context)
    for index, part in enumerate(parts):
        relationship = "parentOf" if index == 0 else "componentOf"
        ingredient = {"title": part.title, "relationship": relationship, "label": f"ingredient-{index}"}
        builder.add_ingredient(ingredient, part.mime, io.BytesIO(part.data))
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(creds.alg, creds.chain, creds.key, None))
    try:
        signed = io.BytesIO()
        builder.sign(signer, mime, io.BytesIO(image.data), signed)
        return signed.getvalue()
    finally:
        signer.close()
        builder.close()
        context.close()


def manifest(model: str, parts: Sequence[Ingredient], *, upstream: bool = False) -> dict[str, Any]:
    """The manifest definition: who made it, with what model, and from which images."""
    from atelier import __version__

    agent = {"name": model}
    if not parts:
        actions = [{"action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA, "softwareAgent": agent}]
    else:
        actions = [
            {"action": "c2pa.opened", "parameters": {"ingredientIds": ["ingredient-0"]}},
            {
                "action": "c2pa.edited",
                "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                "softwareAgent": agent,
                "parameters": {"ingredientIds": [f"ingredient-{i}" for i in range(1, len(parts))]},
            },
        ]
        if upstream and len(parts) == 1:  # only the upstream's own image: Atelier delivered it, edited nothing
            actions[1].pop("parameters")
    return {
        "claim_generator_info": [{"name": "Atelier", "version": __version__}],
        "assertions": [{"label": "c2pa.actions.v2", "data": {"actions": actions}}],
    }


def read_manifest(data: bytes, fmt: str) -> tuple[dict[str, Any] | None, str | None]:
    """The active manifest of ``data`` and its validation state (``Valid``, ``Trusted``, ``Invalid``), or
    ``(None, None)`` when it carries none: what the tests and ``atelier c2pa show`` read back."""
    import c2pa

    try:
        reader = c2pa.Reader(FORMATS[fmt], io.BytesIO(data))
    except c2pa.C2paError:
        return None, None
    try:
        return reader.get_active_manifest(), reader.get_validation_state()
    finally:
        reader.close()


# -- loading and checking credentials -------------------------------------------------------------------


def _mtime(path: Path, variable: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError as exc:
        raise SettingsError(FieldProblem(variable, f"{str(path)[:200]}: {exc.strerror or exc}", "invalid")) from None


@lru_cache(maxsize=4)
def _load(cert: Path, key: Path, cert_mtime: float, key_mtime: float) -> Credentials:
    """Read and check the pair (the modification times are in the cache key: a renewed file is read again)."""
    try:
        import c2pa  # noqa: F401  (its absence is the operator's to fix, said here)
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
    except ImportError:
        raise SettingsError(
            FieldProblem(CERT_VARIABLE, f"signing outputs needs the c2pa extra: {C2PA_EXTRA}")
        ) from None
    chain_pem, key_pem = _read(cert, CERT_VARIABLE), _read(key, KEY_VARIABLE)
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise _problem(CERT_VARIABLE, cert, "is not a PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise _problem(
            KEY_VARIABLE, key, "is not an unencrypted PEM private key (-----BEGIN PRIVATE KEY-----)"
        ) from None
    leaf = chain[0]
    if _public_der(leaf.public_key()) != _public_der(private.public_key()):
        raise _problem(KEY_VARIABLE, key, f"is not the key of the certificate in {cert} (its first certificate)")
    _check_dates(leaf, cert)
    creds = Credentials(
        chain_pem, key_pem, _algorithm(private, key), leaf.subject.rfc4514_string(), leaf.not_valid_after_utc
    )
    _trial(creds, cert)
    return creds


def _public_der(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def _read(path: Path, variable: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SettingsError(FieldProblem(variable, f"{str(path)[:200]}: {exc.strerror or exc}", "invalid")) from None


def _problem(variable: str, path: Path, what: str) -> SettingsError:
    return SettingsError(FieldProblem(variable, f"{str(path)[:200]} {what}", "invalid"))


def _check_dates(leaf: Any, path: Path) -> None:
    now = datetime.now(UTC)
    if leaf.not_valid_after_utc <= now:
        when = leaf.not_valid_after_utc.date().isoformat()
        raise _problem(CERT_VARIABLE, path, f"expired on {when}; renew it (for development: atelier c2pa dev-cert DIR)")
    if leaf.not_valid_before_utc > now:
        when = leaf.not_valid_before_utc.isoformat(timespec="seconds")
        raise _problem(CERT_VARIABLE, path, f"is not valid before {when}; check this machine's clock")


def _algorithm(private: Any, path: Path) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(private, ec.EllipticCurvePrivateKey):
        curves = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
        if private.curve.name in curves:
            return curves[private.curve.name]
    if isinstance(private, rsa.RSAPrivateKey):
        return "ps256"
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise _problem(KEY_VARIABLE, path, "is a key C2PA cannot sign with; use EC P-256/P-384/P-521, RSA or Ed25519")


def _trial(creds: Credentials, path: Path) -> None:
    """Sign a tiny image once: whatever c2pa refuses (key usages, a CA as signer...) is said now."""
    import c2pa

    supported = set(c2pa.Builder.get_supported_mime_types())
    unsigned = sorted(fmt for fmt, mime in FORMATS.items() if mime not in supported)
    if unsigned:
        raise SettingsError(
            FieldProblem(
                CERT_VARIABLE, f"this c2pa build cannot sign {', '.join(unsigned)} outputs; upgrade c2pa-python"
            )
        )
    from atelier.engines.base import OutputImage

    try:
        sign(OutputImage(_tiny_png(), "png", 8, 8), creds, model="start-up check")
    except c2pa.C2paError as exc:
        hint = (
            "C2PA wants a certificate issued by a CA (not self-signed), with the digitalSignature key usage and "
            "an emailProtection or documentSigning extended key usage; for development: atelier c2pa dev-cert DIR"
        )
        raise _problem(CERT_VARIABLE, path, f"was refused by c2pa ({exc}); {hint}") from None


def _tiny_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buffer, "PNG")
    return buffer.getvalue()


def _ingredients(job: Job, read_file: ReadFile | None) -> list[Ingredient]:
    """The job's input images as they came in (stored files), else as png from their pixels."""
    if job.stored_images and read_file is not None:
        return [
            Ingredient(f"input_images[{i}]", read_file(stored.file_id), FORMATS.get(stored.format.lower(), "image/png"))
            for i, stored in enumerate(job.stored_images)
        ]
    parts = []
    for i, image in enumerate(job.images):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        parts.append(Ingredient(f"input_images[{i}]", buffer.getvalue(), "image/png"))
    return parts


def _has_manifest(data: bytes, mime: str) -> bool:
    import c2pa

    try:
        c2pa.Reader(mime, io.BytesIO(data)).close()
    except c2pa.C2paError:
        return False
    return True
