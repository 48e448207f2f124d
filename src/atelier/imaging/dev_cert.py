"""A development-only C2PA signing pair, for ``atelier c2pa dev-cert DIR``.

C2PA validators refuse a self-signed signing certificate and one without the right usages, so this
makes what a real certificate authority would issue, in miniature: a throwaway CA (``CA:TRUE``, may sign
certificates) and an end-entity certificate it signed (``CA:FALSE``, digital signature, extended key
usage ``emailProtection`` as the C2PA trust model lists), both EC P-256 (signed as ES256). The chain file
holds the end entity then the CA, as ``ATELIER_C2PA_CERT`` wants. Every name in them says development:
no trust list has this CA, so readers show the manifest as valid but its signer as untrusted
(``signingCredential.untrusted``). The CA's key is not kept: nothing else can be issued from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

CERT_NAME, KEY_NAME = "c2pa-dev-cert.pem", "c2pa-dev-key.pem"
ORGANIZATION = "Atelier DEVELOPMENT ONLY - not trusted"


@dataclass(frozen=True)
class DevPair:
    cert: Path
    key: Path
    not_after: datetime


def write_dev_pair(folder: Path, *, days: int = 90, overwrite: bool = False, now: datetime | None = None) -> DevPair:
    """Write ``c2pa-dev-cert.pem`` and ``c2pa-dev-key.pem`` (mode 600) into ``folder``, valid from ``now``
    (the clock's, unless given) for ``days``; ``FileExistsError`` if either is there and ``overwrite`` is false."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = folder.resolve()  # the paths printed go into environment variables: absolute ones
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / CERT_NAME, folder / KEY_NAME
    for path in (cert_path, key_path):
        if path.exists() and not overwrite:
            raise FileExistsError(path)
    now = now or datetime.now(UTC)
    not_after = now + timedelta(days=days)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _ca_certificate(ca_key, now, not_after)
    leaf = _signing_certificate(key, ca, ca_key, now, not_after)
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, ca))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    cert_path.write_bytes(chain)
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(pem)
    os.chmod(key_path, 0o600)  # also when it was there before with wider permissions
    return DevPair(cert_path, key_path, not_after)


def _name(common_name: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        ]
    )


def _ca_certificate(ca_key: ec.EllipticCurvePrivateKey, now: datetime, not_after: datetime) -> x509.Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    name = _name("Atelier development CA (DEVELOPMENT ONLY)")
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))  # a little slack for clocks a moment apart
        .not_valid_after(not_after + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(key_cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _signing_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime,
    not_after: datetime,
) -> x509.Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    return (
        x509.CertificateBuilder()
        .subject_name(_name("Atelier development signer (DEVELOPMENT ONLY)"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _usage(*, digital_signature: bool = False, key_cert_sign: bool = False) -> x509.KeyUsage:
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )
