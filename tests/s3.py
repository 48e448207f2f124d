"""A local S3-compatible server for the bucket tests: moto's server mode on a loopback port, offline.

``start_s3()`` starts one (tests/conftest.py keeps one per session: ``s3_server``); ``server.bucket()``
creates a fresh bucket, so tests never see each other's objects. ``Bucket.settings`` are the settings a
server needs to keep its files there (``ATELIER_FILES_URL``, ``ATELIER_S3_ENDPOINT_URL`` and the
``AWS_*`` credentials, which moto accepts whatever they are). moto checks no signatures: tests of
credentials that must be refused need a real store, and are not here.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

REGION = "us-east-1"
KEY_ID, SECRET = "atelier-test-key", "atelier-test-secret"


@dataclass(frozen=True)
class Bucket:
    endpoint: str
    name: str
    prefix: str

    @property
    def url(self) -> str:
        return f"s3://{self.name}/{self.prefix}".rstrip("/")

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "files_url": self.url,
            "s3_endpoint_url": self.endpoint,
            "aws_access_key_id": KEY_ID,
            "aws_secret_access_key": SECRET,
            "aws_region": REGION,
        }

    @property
    def env(self) -> dict[str, str]:
        """The same settings as environment variables, for a server process."""
        return {
            "ATELIER_FILES_URL": self.url,
            "ATELIER_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_REGION": REGION,
        }

    def store(self) -> Any:
        """An obstore client on the whole bucket (no prefix): the tests' own view, not Atelier's."""
        from obstore.store import S3Store

        return S3Store(
            self.name, endpoint=self.endpoint, access_key_id=KEY_ID, secret_access_key=SECRET, region=REGION,
            client_options={"allow_http": True},
        )  # fmt: skip

    def read(self, key: str) -> bytes:
        import obstore

        return bytes(obstore.get(self.store(), key).bytes())

    def content_type(self, key: str) -> str | None:
        import obstore

        return obstore.get(self.store(), key).attributes.get("Content-Type")

    def delete(self, key: str) -> None:
        import obstore

        obstore.delete(self.store(), key)

    def keys(self) -> list[str]:
        """Every key in the bucket (prefix included), read with plain HTTP (moto answers unsigned requests)."""
        import re

        listing = httpx.get(f"{self.endpoint}/{self.name}", params={"list-type": "2"}, timeout=10)
        listing.raise_for_status()
        return sorted(re.findall(r"<Key>([^<]*)</Key>", listing.text))


class S3Server:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def bucket(self, prefix: str = "atelier/files") -> Bucket:
        name = f"atelier-{uuid.uuid4().hex[:16]}"
        httpx.put(f"{self.endpoint}/{name}", timeout=10).raise_for_status()
        return Bucket(self.endpoint, name, prefix)

    def stop(self) -> None:
        self._server.stop()


def start_s3() -> S3Server:
    return S3Server()
