"""Parsers for settings whose values are small languages: rates (``60/min``), allow-lists of hosts
and networks (``10.0.0.0/8,images.internal``) and bucket URLs (``s3://bucket/prefix``).

A leaf: it imports nothing from Atelier, so ``atelier.config`` can check these values when the settings
are read without importing the modules that use them (``atelier.jobs.limits``, ``atelier.fetch``), which
import the settings' type themselves.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
UNITS |= {"h": 3600.0, "hr": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*\.?\d*)\s*([a-z]+?)s?\s*$")

_HOST_NAME = re.compile(r"^\.?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?$")


@dataclass(frozen=True)
class Rate:
    count: int
    seconds: float  # the period

    def __str__(self) -> str:
        names = {1.0: "second", 60.0: "minute", 3600.0: "hour", 86400.0: "day"}
        period = names.get(self.seconds) or f"{self.seconds:g} seconds"
        return f"{self.count} per {period}"


def parse_rate(text: str) -> Rate:
    """``"60/min"`` → ``Rate(60, 60.0)``; ``ValueError`` saying what is allowed otherwise."""
    match = _RATE.match(text.lower())
    period = _period(match.group(2), match.group(3)) if match else None
    if match is None or period is None:
        raise ValueError(f"got {text[:40]!r}; write a rate as N/period, e.g. '60/min', '1000/day' or '10/30s'")
    count = int(match.group(1))
    if count < 1:
        raise ValueError(f"got {text[:40]!r}; the count must be at least 1 (leave the setting unset for no limit)")
    return Rate(count, period)


def _period(scale: str, unit: str) -> float | None:
    seconds = UNITS.get(unit)
    if seconds is None or scale == ".":
        return None
    period = float(scale or 1) * seconds
    return period if period > 0 else None


def parse_allow(
    entries: Iterable[str], setting: str = "ATELIER_FETCH_ALLOW"
) -> tuple[tuple[str, ...], tuple[IPNetwork, ...]]:
    """Split ``setting``'s entries into host names and networks; ValueError names a bad one."""
    hosts: list[str] = []
    networks: list[IPNetwork] = []
    for entry in (e.strip().lower() for e in entries):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        name = "." + entry[2:] if entry.startswith("*.") else entry
        if not _HOST_NAME.match(name):
            raise ValueError(
                f"{setting} entry {entry!r} is neither a network (10.0.0.0/8, 192.168.1.5, fd00::/8) "
                "nor a host name (images.internal, or .example.com for it and its subdomains)"
            )
        hosts.append(name.rstrip("."))
    return tuple(hosts), tuple(networks)


_S3_URL = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>.*))?$")


@dataclass(frozen=True)
class BucketURL:
    """``s3://bucket/prefix`` as given in ``ATELIER_FILES_URL``."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> BucketURL:
        match = _S3_URL.match(url.strip())
        if match is None:
            raise ValueError(
                f"got {url[:80]!r}; give a bucket as s3://bucket or s3://bucket/prefix (a bucket name is 3 to 63 "
                "lower-case letters, digits, dots and dashes), or leave it unset to keep files in the data folder"
            )
        return cls(match["bucket"], (match["prefix"] or "").strip("/"))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")
