"""Which addresses an input image URL may reach (``atelier.fetch.FetchPolicy``), and how the operator widens it."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

from atelier.config import Settings
from atelier.fetch import FetchPolicy, classify

REFUSED = {
    "127.0.0.1": "a loopback address",
    "127.255.0.9": "a loopback address",
    "10.0.0.1": "a private address",
    "172.16.5.4": "a private address",
    "172.31.255.255": "a private address",
    "192.168.0.10": "a private address",
    "100.64.0.1": "a shared (carrier-grade NAT) address",
    "100.127.255.254": "a shared (carrier-grade NAT) address",
    "169.254.10.10": "a link-local address",
    "224.0.0.251": "a multicast address",
    "239.255.255.250": "a multicast address",
    "0.0.0.0": "an unspecified address",
    "0.1.2.3": "an unspecified address",
    "240.0.0.1": "a reserved address",
    "255.255.255.255": "the broadcast address",
    "198.18.0.1": "a reserved address",  # benchmarking, not routable
    "::": "an unspecified address",
    "::1": "a loopback address",
    "fc00::1": "a private (unique local) address",
    "fd12:3456::1": "a private (unique local) address",
    "fe80::1": "a link-local address",
    "fec0::1": "a site-local address",
    "ff02::1": "a multicast address",
    "::ffff:127.0.0.1": "a loopback address written as IPv6 (127.0.0.1)",
    "::ffff:10.0.0.1": "a private address written as IPv6 (10.0.0.1)",
    "::127.0.0.1": "a loopback address written as IPv6 (127.0.0.1)",
    "64:ff9b::a9fe:101": "a link-local address written as IPv6 (169.254.1.1)",
    "2002:c0a8:101::": "a private address written as IPv6 (192.168.1.1)",
}
PUBLIC = ["8.8.8.8", "93.184.215.14", "172.32.0.1", "100.128.0.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
METADATA = [
    "169.254.169.254",
    "::ffff:169.254.169.254",
    "64:ff9b::a9fe:a9fe",
    "169.254.170.2",
    "fd00:ec2::254",
    "100.100.100.200",
    "168.63.129.16",
    "192.0.0.192",
]


@pytest.mark.parametrize(("address", "what"), REFUSED.items())
def test_non_public_addresses_are_refused_by_default_and_named(address: str, what: str) -> None:
    ip = ipaddress.ip_address(address)
    assert classify(ip) == what
    refusal = FetchPolicy().refusal("example.com", ip)
    assert refusal is not None and refusal[0] == what and "ATELIER_FETCH_ALLOW" in refusal[1]


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address: str) -> None:
    assert FetchPolicy().refusal("example.com", ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("address", METADATA)
def test_metadata_stays_refused_for_trusted_hosts_and_in_development(address: str) -> None:
    ip = ipaddress.ip_address(address)
    for policy in (FetchPolicy(), FetchPolicy(allow_private=True), FetchPolicy.from_allow(["metadata.internal"])):
        refusal = policy.refusal("metadata.internal", ip)
        assert refusal is not None and refusal[0] == "a cloud metadata address"
    assert FetchPolicy.from_allow([f"{address}"]).refusal("metadata.internal", ip) is None  # named outright


def test_the_allow_list_trusts_names_subdomains_and_networks() -> None:
    policy = FetchPolicy.from_allow(["images.internal", ".cdn.internal", "*.assets.lan", "10.0.0.0/8", "fd00::/8"])
    private = ipaddress.ip_address("192.168.1.5")
    assert policy.refusal("images.internal", private) is None
    assert policy.refusal("IMAGES.internal.", private) is None
    assert policy.refusal("eu.cdn.internal", private) is None
    assert policy.refusal("a.b.assets.lan", private) is None
    assert policy.refusal("evilimages.internal", private) is not None
    assert policy.refusal("cdn.internal.evil.com", private) is not None
    assert policy.refusal("any.host", ipaddress.ip_address("10.9.8.7")) is None
    assert policy.refusal("any.host", ipaddress.ip_address("::ffff:10.9.8.7")) is None
    assert policy.refusal("any.host", ipaddress.ip_address("fd00::5")) is None
    assert policy.refusal("any.host", ipaddress.ip_address("11.0.0.1")) is None  # public anyway
    assert policy.refusal("any.host", ipaddress.ip_address("127.0.0.1")) is not None


def test_allow_private_allows_every_non_public_address() -> None:
    for address in REFUSED:
        assert FetchPolicy(allow_private=True).refusal("x", ipaddress.ip_address(address)) is None


def test_settings_read_the_allow_list_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATELIER_FETCH_ALLOW", "10.0.0.0/8, images.internal,")
    monkeypatch.setenv("ATELIER_FETCH_ALLOW_PRIVATE", "false")
    settings = Settings()
    assert settings.fetch_allow == ["10.0.0.0/8", "images.internal"]
    policy = FetchPolicy.from_settings(settings)
    assert policy.hosts == ("images.internal",) and policy.networks == (ipaddress.ip_network("10.0.0.0/8"),)
    assert not policy.allow_private and FetchPolicy.from_settings(Settings(fetch_allow_private=True)).allow_private


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "http://images.internal", "images internal", "a..b"])
def test_a_bad_allow_list_entry_stops_the_server_with_its_name(entry: str) -> None:
    with pytest.raises(ValidationError, match="ATELIER_FETCH_ALLOW entry"):
        Settings(fetch_allow=entry)


def test_defaults_are_the_safe_ones() -> None:
    settings = Settings()
    assert settings.fetch_allow == [] and settings.fetch_allow_private is False
    assert settings.max_body_bytes == 128 * 1024 * 1024
    policy = FetchPolicy.from_settings(settings)
    assert policy.max_redirects == 5 and policy.timeout == 30.0
